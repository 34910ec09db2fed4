"""Health checks during the drain: answered, then refused UNAVAILABLE, then the port closes;
never grpc's bare CANCELLED.

grpc's `server.stop()` cancels (a bare CANCELLED, trailers only, grpc/grpc#41785) every call that
reaches the server after the stop began: one still queued for a handler, one whose connection was
accepted just before the listener closed, one sent before its client read the GOAWAY. The
gateway cannot answer those, so it begins the stop only once nothing is coming: once the calls
queued at the signal have started, it refuses health checks and reflection with UNAVAILABLE
SHUTTING_DOWN, and waits until no call came for 0.25 s. Health checks were neither refused nor
counted: they were answered NOT_SERVING up to the stop, and the ones arriving as it began got
CANCELLED (the flaky `test_signal_drains_stream_refuses_new_calls_and_exits_zero`).

The callers here behave as health checkers do: a refused checker waits before it looks again.
Steady Create/StreamCreate/CountTokens traffic is served until the stop (its clients move at the
GOAWAY: test_scale_out's drain without failures), and a call of it sent as the stop begins may
still get grpc's CANCELLED: that window the gateway cannot close (README "Operating it").
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.integration.test_clients import (
    CONNECT_REFUSED,
    PAUSE_AFTER_REFUSAL,
    REFUSED_BY_GATEWAY,
    drain_outcome,
    stream_request,
)
from tests.process_harness import ServerProcess, start_server_process
from tests.trace_polling import eventually

CHECKERS = 4


async def check(channel: grpc.aio.Channel) -> str:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return f"OK {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"


async def caller(
    server: ServerProcess,
    call: Callable[[grpc.aio.Channel], Awaitable[str]],
    done: asyncio.Event,
    seen: Counter[str],
) -> None:
    """Calls on fresh channels (a new client each time) until the port is closed."""
    while not done.is_set():
        async with grpc.aio.insecure_channel(server.address) as channel:
            try:
                result = await call(channel)
            except grpc.aio.AioRpcError as exc:
                result = drain_outcome(exc)
        seen[f"{call.__name__}: {result}"] += 1
        if result == CONNECT_REFUSED:
            return
        await asyncio.sleep(PAUSE_AFTER_REFUSAL if result == REFUSED_BY_GATEWAY else 0.005)


async def test_checks_made_through_the_drain_are_answered_or_refused_never_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream([f"w{i} " for i in range(32)]), chunk_delay=0.15))
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "10"],
    )
    seen: Counter[str] = Counter()
    done = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                stream_request(upstream.base_url), timeout=30
            )
            await stream.read()  # in flight: the drain lasts while it runs (~5 s)
            kinds = [check] * CHECKERS
            callers = [asyncio.create_task(caller(server, kind, done, seen)) for kind in kinds]
            await eventually(lambda: sum(seen.values()) >= CHECKERS)  # the checkers are calling
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*callers), 10)  # each saw the port closed
            assert not stream.done(), "the stream ended before the port closed"
            while await stream.read() is not grpc.aio.EOF:
                pass
            assert await stream.code() == grpc.StatusCode.OK
        exit_code = await asyncio.to_thread(server.wait, 20)
    finally:
        done.set()
        server.close()
    assert exit_code == 0, server.log[-2000:]
    allowed = {
        "check: OK SERVING",  # before the signal
        "check: OK NOT_SERVING",  # after it, while the calls queued at the signal start
        f"check: {REFUSED_BY_GATEWAY}",
        f"check: {CONNECT_REFUSED}",
    }
    assert set(seen) <= allowed, f"{seen}\n{server.log[-2000:]}"
    # The gateway itself refused checks (with its ErrorInfo) before the port closed.
    assert seen[f"check: {REFUSED_BY_GATEWAY}"] >= 1, seen
    assert seen[f"check: {CONNECT_REFUSED}"] == CHECKERS, seen


STORM_CHECKERS = 8  # each calls again as soon as it is answered: several hundred checks a second
STEADY_INTERVAL = 0.05  # 20 calls a second: steady traffic, served until the GOAWAY


async def count_tokens(stub: chat_pb2_grpc.ChatCompletionServiceStub) -> str:
    request = chat_pb2.CountTokensRequest(  # answered by the gateway itself
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint="https://api.openai.com/v1",
            context_window=8000,
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )
    try:
        await stub.CountTokens(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return drain_outcome(exc)
    return "OK"


async def test_a_health_check_storm_during_the_drain_does_not_refuse_steady_calls(tmp_path: Path) -> None:
    """Health checks and reflection count for the drain's quiet, not for its backlog rate: a storm
    of checks (hundreds a second) is no queue of real calls, and steady traffic is served until
    the GOAWAY. Counted, the storm switched the drain to refusing every call (UNAVAILABLE
    SHUTTING_DOWN) for up to 3 s: each an error a client of steady traffic saw."""
    server = await asyncio.to_thread(start_server_process, tmp_path, extra_args=["--grace-period", "10"])
    steady: Counter[str] = Counter()
    checks: Counter[str] = Counter()
    done = asyncio.Event()

    async def storm(channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while not done.is_set():
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                checks["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                checks[drain_outcome(exc)] += 1
                await asyncio.sleep(0.001)

    async def traffic(channel: grpc.aio.Channel) -> None:
        stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        while not done.is_set():
            result = await count_tokens(stub)
            steady[result] += 1
            if result == CONNECT_REFUSED:
                return
            await asyncio.sleep(STEADY_INTERVAL)

    try:
        async with (
            grpc.aio.insecure_channel(server.address) as checked,
            grpc.aio.insecure_channel(server.address) as served,
        ):
            storms = [asyncio.create_task(storm(checked)) for _ in range(STORM_CHECKERS)]
            steady_task = asyncio.create_task(traffic(served))
            await eventually(
                lambda: steady["OK"] >= 3 and checks["OK"] >= 100,
                message="3 steady calls and 100 checks did not succeed before the signal",
            )
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(steady_task, 10)  # it saw the port closed
            done.set()
            await asyncio.gather(*storms)
        exit_code = await asyncio.to_thread(server.wait, 20)
    finally:
        done.set()
        server.close()
    assert exit_code == 0, server.log[-2000:]
    assert checks[REFUSED_BY_GATEWAY] >= 1, checks
    # Served until the port closed, never refused (a call sent as grpc's stop begins may get its
    # bare CANCELLED: grpc/grpc#41785, the one window the gateway cannot close).
    assert steady[REFUSED_BY_GATEWAY] == 0, (steady, checks)
    assert set(steady) <= {"OK", CONNECT_REFUSED, "CANCELLED None 'CANCELLED'"}, steady


async def reflect_busy_client(address: str) -> str:
    """A reflection call whose client is busy for 50 ms between its headers and its request (a
    loaded client's event loop): what it got."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 5)
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
        try:
            await call.wait_for_connection()  # the headers are sent
            time.sleep(0.05)  # noqa: ASYNC251 - the client's loop busy: the server answers meanwhile
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return drain_outcome(exc)
        return "OK"


async def test_reflection_refused_in_the_drain_gets_the_refusal_not_internal(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A reflection call the drain refuses ends UNAVAILABLE SHUTTING_DOWN with its ErrorInfo, even
    from a client that sent its request late. Refused at its headers, before the request came,
    grpc's Python client failed to send the request into a call already ended and reported
    INTERNAL "Internal error from Core" with no details (1 in ~85 reflection calls in the drain
    for a client on fresh channels; every call here)."""
    upstream.script(Reply(sse=text_stream([f"w{i} " for i in range(32)]), chunk_delay=0.15))
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "10"],
    )
    seen: Counter[str] = Counter()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                stream_request(upstream.base_url), timeout=30
            )
            await stream.read()  # in flight: the drain lasts while it runs
            assert await reflect_busy_client(server.address) == "OK"
            server.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            while True:  # until the drain refuses checks and reflection
                try:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    assert drain_outcome(exc) == REFUSED_BY_GATEWAY, drain_outcome(exc)
                    break
                await asyncio.sleep(0.02)
            # Each call keeps the drain from going quiet: the port stays open up to 1 s more.
            for _ in range(4):
                seen[await reflect_busy_client(server.address)] += 1
            stream.cancel()
        exit_code = await asyncio.to_thread(server.wait, 20)
    finally:
        server.close()
    assert exit_code == 0, server.log[-2000:]
    assert set(seen) <= {REFUSED_BY_GATEWAY, CONNECT_REFUSED}, seen
    assert seen[REFUSED_BY_GATEWAY] >= 2, seen


async def test_a_reflection_stream_left_open_at_the_signal_ends_shutting_down_at_once(tmp_path: Path) -> None:
    """A reflection stream a tool keeps open for its session ends with UNAVAILABLE SHUTTING_DOWN
    once the calls are done, as health Watches do. Untracked, it held grpc's stop for the whole
    grace period (10 s here, with no call in flight) and then got grpc's bare UNAVAILABLE
    ("Cancelling all calls", no ErrorInfo)."""
    server = await asyncio.to_thread(start_server_process, tmp_path, extra_args=["--grace-period", "10"])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=30)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            answer = await call.read()
            assert answer.list_services_response.service, answer
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            ended = time.monotonic() - signalled
        exit_code = await asyncio.to_thread(server.wait, 20)
    finally:
        server.close()
    assert exit_code == 0, server.log[-2000:]
    assert drain_outcome(raised.value) == REFUSED_BY_GATEWAY, drain_outcome(raised.value)
    assert ended < 3.0, f"the open stream held the drain {ended:.1f} s"
