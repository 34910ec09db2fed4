"""Only the caller's own deadline is DEADLINE_EXCEEDED: a TimeoutError from anything else (a
database pool, the key store, a lock) is UNAVAILABLE INTERNAL_TIMEOUT naming what timed out.

A real grpc.aio server serves the gateway's own handler plumbing (`server.api.handlers`,
`run_unary`, `map_exception`); the handler times out on a real held lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import empty_pb2

from server.api.context import Context, map_exception, run_unary
from server.api.handlers import service, unary
from server.errors import GatewayError
from tests.integration.test_security_e2e import error_info

SERVICE = "test.Timeouts"


class LockedStore:
    """Stands for a store whose pool is exhausted: acquiring waits on a lock somebody holds."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()

    async def lookup(self) -> None:
        async with asyncio.timeout(0.05):
            await self.lock.acquire()


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, LockedStore, list[GatewayError]]]:
    store = LockedStore()
    await store.lock.acquire()
    mapped: list[GatewayError] = []

    async def store_call(data: bytes, context: Context) -> empty_pb2.Empty:
        async def call() -> empty_pb2.Empty:
            await store.lookup()
            return empty_pb2.Empty()

        return await run_unary(context, call)

    async def after_deadline(data: bytes, context: Context) -> empty_pb2.Empty:
        # grpc cancels the handler when the caller's deadline passes: a TimeoutError met then
        # (the gateway's own timer racing grpc's) is the caller's deadline.
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            mapped.append(map_exception(TimeoutError(), "after_deadline", context))
            raise
        return empty_pb2.Empty()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (service(SERVICE, {"Store": unary(store_call), "AfterDeadline": unary(after_deadline)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, store, mapped
    finally:
        await channel.close()
        await server.stop(None)


def method(channel: grpc.aio.Channel, name: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )


async def test_an_internal_timeout_is_not_the_callers_deadline(
    served: tuple[grpc.aio.Channel, LockedStore, list[GatewayError]],
) -> None:
    channel, _, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await method(channel, "Store")(empty_pb2.Empty(), timeout=30)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    info = error_info(failed.value)
    assert info.reason == "INTERNAL_TIMEOUT"
    # What timed out is named (the function that waited), and the caller's deadline is not blamed.
    assert info.metadata["operation"].endswith("LockedStore.lookup") or info.metadata["operation"].endswith(
        ".lookup"
    ), info.metadata
    assert "deadline" not in info.reason.lower()


async def test_a_timeout_with_no_caller_deadline_is_internal_too(
    served: tuple[grpc.aio.Channel, LockedStore, list[GatewayError]],
) -> None:
    channel, _, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await method(channel, "Store")(empty_pb2.Empty())
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(failed.value).reason == "INTERNAL_TIMEOUT"


async def test_a_timeout_once_the_callers_deadline_passed_is_deadline_exceeded(
    served: tuple[grpc.aio.Channel, LockedStore, list[GatewayError]],
) -> None:
    channel, _, mapped = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await method(channel, "AfterDeadline")(empty_pb2.Empty(), timeout=0.2)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):
        if mapped:
            break
        await asyncio.sleep(0.01)
    assert [(e.code, e.reason) for e in mapped] == [(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")]
