"""gRPC method handlers that take raw request bytes (the servicers decode them themselves)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from server.api.context import Context
from server.inflight import InFlight, StreamParts

UnaryBehaviour = Callable[[bytes, Context], Awaitable[Message]]
StreamBehaviour = Callable[[bytes, Context], AsyncIterator[Message | bytes]]


def _serialize(message: Message | bytes) -> bytes:
    # A stream's usual delta comes serialized already (`relay.plain_wire`): sent as it is.
    if type(message) is bytes:
        return message
    return message.SerializeToString()  # type: ignore[union-attr]


def unary(behaviour: UnaryBehaviour) -> grpc.RpcMethodHandler:
    # No request_deserializer: bytes that do not decode must become INVALID_ARGUMENT, not UNKNOWN.
    return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=_serialize)


def server_stream(behaviour: StreamBehaviour) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(behaviour, response_serializer=_serialize)


class Service(grpc.GenericRpcHandler):  # type: ignore[misc]
    """One service's method handlers, found by full method name; `track` puts them under shutdown.

    `refused(method)` (the short name, e.g. "Create") is told of each call refused while the
    server drains: such a call never reaches its handler."""

    def __init__(
        self,
        name: str,
        methods: Mapping[str, grpc.RpcMethodHandler],
        refused: Callable[[str], None] | None = None,
        parts: Mapping[str, StreamParts[Any, Message | bytes]] | None = None,
    ) -> None:
        self._handlers = {f"/{name}/{method}": handler for method, handler in methods.items()}
        self._refused = refused
        # A stream method's parts (`server.inflight.StreamParts`), which `track` hands to
        # InFlight.stream in place of the method's handler: the handler itself must stay an
        # async generator function (grpc runs any other callable as a sync handler, in a thread).
        self._parts = {f"/{name}/{method}": p for method, p in (parts or {}).items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def track(self, calls: InFlight) -> None:
        """Wrap every method once (not per call) so `calls` can drain and cut them."""
        for method, handler in self._handlers.items():
            refused = None
            if self._refused is not None:
                refused = functools.partial(self._refused, method.rsplit("/", 1)[1])
            if handler.unary_unary is not None:
                handler = grpc.unary_unary_rpc_method_handler(
                    calls.unary(handler.unary_unary, refused), response_serializer=handler.response_serializer
                )
            elif handler.unary_stream is not None:
                handler = grpc.unary_stream_rpc_method_handler(
                    calls.stream(self._parts.get(method, handler.unary_stream), refused),
                    response_serializer=handler.response_serializer,
                )
            self._handlers[method] = handler


def service(
    name: str,
    methods: Mapping[str, grpc.RpcMethodHandler],
    refused: Callable[[str], None] | None = None,
    parts: Mapping[str, StreamParts[Any, Message | bytes]] | None = None,
) -> Service:
    return Service(name, methods, refused, parts)
