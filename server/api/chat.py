"""ChatCompletionService: Create, StreamCreate, CountTokens."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from llmgateway.v1 import chat_pb2

from server.api.context import Authenticator, Context, deadline_of, parse, run_unary
from server.api.status import abort
from server.errors import DeadlineExceeded, GatewayError
from server.gateway import Gateway

log = logging.getLogger("llmgateway.api")
SERVICE = "llmgateway.v1.ChatCompletionService"


class ChatCompletionServicer:
    def __init__(self, gateway: Gateway, auth: Authenticator) -> None:
        self._gateway = gateway
        self._auth = auth

    async def create(self, data: bytes, context: Context) -> chat_pb2.CreateResponse:
        async def call() -> chat_pb2.CreateResponse:
            actor = await self._auth.actor_for(context)
            request = parse(chat_pb2.CreateRequest, data)
            return await self._gateway.create(request, actor, deadline_of(context))

        return await run_unary(context, call)

    async def count_tokens(self, data: bytes, context: Context) -> chat_pb2.CountTokensResponse:
        async def call() -> chat_pb2.CountTokensResponse:
            await self._auth.actor_for(context)
            # Wire-identical to CreateRequest by construction (same fields, same numbers).
            return self._gateway.count_tokens(parse(chat_pb2.CreateRequest, data))

        return await run_unary(context, call)

    async def stream_create(self, data: bytes, context: Context) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        try:
            actor = await self._auth.actor_for(context)
            request = parse(chat_pb2.CreateRequest, data)
            async for event in self._gateway.stream(request, actor, deadline_of(context)):
                yield event
        except GatewayError as error:
            await abort(context, error)
        except TimeoutError:
            await abort(context, DeadlineExceeded("the caller's deadline passed"))
        except Exception:  # noqa: BLE001 - last line of defence, as in run_unary
            log.exception("unexpected failure in StreamCreate")
            await abort(context, GatewayError("internal error; see the gateway log"))

    def handlers(self) -> grpc.GenericRpcHandler:
        def unary(behaviour: object) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=None, response_serializer=_serialize  # type: ignore[arg-type]
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Create": unary(self.create),
                "CountTokens": unary(self.count_tokens),
                "StreamCreate": grpc.unary_stream_rpc_method_handler(
                    self.stream_create, request_deserializer=None, response_serializer=_serialize  # type: ignore[arg-type]
                ),
            },
        )


def _serialize(message: chat_pb2.CreateResponse) -> bytes:
    return message.SerializeToString()
