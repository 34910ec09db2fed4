"""gRPC method handlers that take raw request bytes (the servicers decode them themselves)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
from google.protobuf.message import Message

from server.api.context import Context

UnaryBehaviour = Callable[[bytes, Context], Awaitable[Message]]
StreamBehaviour = Callable[[bytes, Context], AsyncIterator[Message]]


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def unary(behaviour: UnaryBehaviour) -> grpc.RpcMethodHandler:
    # No request_deserializer: bytes that do not decode must become INVALID_ARGUMENT, not UNKNOWN.
    return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=_serialize)


def server_stream(behaviour: StreamBehaviour) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(behaviour, response_serializer=_serialize)


def service(name: str, methods: Mapping[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, dict(methods))
