"""Server reflection, v1alpha and v1, with JSON field names filled in.

grpcio-reflection builds FileDescriptorProtos with `CopyToProto`, which leaves `json_name`
empty; grpcurl 1.8 then prints snake_case field names instead of protojson's lowerCamelCase.
We fill `json_name` the way protoc does. grpcio-reflection ships only v1alpha; v1's messages are
wire-identical, so the same servicer answers both (grpcurl >= 1.9 and buf curl ask v1 first).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from server.api.status import abort
from server.errors import ShuttingDown
from server.inflight import uncancel_current

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"


def json_name(field_name: str) -> str:
    """protoc's rule: drop underscores, capitalising the letter after each."""
    parts = field_name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _fill_message(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if not field.json_name:
            field.json_name = json_name(field.name)
    for field in message.extension:
        if not field.json_name:
            field.json_name = json_name(field.name)
    for nested in message.nested_type:
        _fill_message(nested)


@lru_cache(maxsize=256)
def with_json_names(serialized: bytes) -> bytes:
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    for message in proto.message_type:
        _fill_message(message)
    return proto.SerializeToString()


class JsonNameReflectionServicer(ReflectionServicer):  # type: ignore[misc]
    """`admit(context)` runs at each call's first request (the drain counts it, and refuses it
    once it refuses new calls).

    Not before it: a call refused before its client had sent its request ended at the client
    with INTERNAL "Internal error from Core" and no ErrorInfo, not the refusal. grpc's Python
    client sends a stream's first request after its headers; the refusal's trailers arriving
    in between fail that send, and the client reports that failure instead of the status.

    A stream left open (a tool that keeps it for its session) ends with UNAVAILABLE
    SHUTTING_DOWN at `end_streams`, as health Watches do: it held grpc's stop for the whole
    grace period (with no call in flight) and then ended with grpc's bare UNAVAILABLE.
    """

    def __init__(
        self, service_names: Sequence[str], admit: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        super().__init__(service_names)
        self._admit = admit
        self._streams: set[asyncio.Task[Any]] = set()
        self._ending = False

    async def ServerReflectionInfo(  # noqa: N802 - the generated method name
        self, request_iterator: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        requests = request_iterator if self._admit is None else self._admitted(request_iterator, context)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            if not self._ending:
                async for response in super().ServerReflectionInfo(requests, context):
                    if response.HasField("file_descriptor_response"):
                        files = response.file_descriptor_response.file_descriptor_proto
                        fixed = [with_json_names(bytes(f)) for f in files]
                        del files[:]
                        files.extend(fixed)
                    yield response
                return
        except asyncio.CancelledError:
            if not self._ending:
                raise  # the caller went away
            uncancel_current()
        finally:
            if task is not None:
                self._streams.discard(task)
        await abort(context, ShuttingDown("the server is shutting down", metadata={"phase": "reflection"}))

    def end_streams(self) -> None:
        """The server stops: every reflection stream still open ends (UNAVAILABLE SHUTTING_DOWN)."""
        self._ending = True
        for task in self._streams:
            task.cancel()

    async def _admitted(
        self, requests: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        admitted = False
        async for request in requests:
            if not admitted and self._admit is not None:
                await self._admit(context)  # a refusal raises (the call ends with its status)
                admitted = True
            yield request


def enable_reflection(
    server: grpc.aio.Server,
    service_names: Sequence[str],
    admit: Callable[[Any], Awaitable[None]] | None = None,
) -> JsonNameReflectionServicer:
    names = (*service_names, V1ALPHA, V1)
    servicer = JsonNameReflectionServicer(names, admit)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1ALPHA, V1)
        )
    )
    return servicer
