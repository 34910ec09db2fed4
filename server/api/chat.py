"""ChatCompletionService: Create, StreamCreate, CountTokens."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from llmgateway.v1 import chat_pb2

from server import metrics
from server.api.context import Authenticator, Context, deadline_of, map_exception, parse, run_unary
from server.api.handlers import server_stream, service, unary
from server.api.status import abort
from server.errors import GatewayError
from server.gateway import Gateway
from server.routing.router import wants_routing

log = logging.getLogger("llmgateway.api")
SERVICE = "llmgateway.v1.ChatCompletionService"
# Where an unexpected failure of Create is logged from: the name run_unary gave it.
_CREATE = "ChatCompletionServicer.create"


class ChatCompletionServicer:
    def __init__(self, gateway: Gateway, auth: Authenticator) -> None:
        self._gateway = gateway
        self._auth = auth
        self._stream_create = StreamCreate(gateway, auth)

    async def create(self, data: bytes, context: Context) -> chat_pb2.CreateResponse:
        # `run_unary` written out (the same handling, in the same order): no closure made and no
        # coroutine layer more for every call to pass through, each time the call resumes.
        with metrics.RequestScope("Create", "unary", context) as scope:
            try:
                actor = await self._auth.actor_for(context)
                request = parse(chat_pb2.CreateRequest, data)
                routed = wants_routing(request)  # asked once: the gateway routes by it too
                scope.labels(request.llm_config, proves=not routed)
                return await self._gateway.create(request, actor, deadline_of(context), routed=routed)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence, as in run_unary
                error = map_exception(exc, _CREATE, context)
            try:
                await abort(context, error)
            finally:
                del error  # as in run_unary: the error's traceback holds this frame (a cycle)
            raise AssertionError("unreachable: abort raises")

    async def count_tokens(self, data: bytes, context: Context) -> chat_pb2.CountTokensResponse:
        async def call() -> chat_pb2.CountTokensResponse:
            actor = await self._auth.actor_for(context)
            # Wire-identical to CreateRequest by construction (same fields, same numbers).
            request = parse(chat_pb2.CreateRequest, data)
            scope.labels(request.llm_config, proves=False)  # no upstream call: no proof
            return await self._gateway.count_tokens(request, actor)

        with metrics.RequestScope("CountTokens", "unary", context) as scope:
            return await run_unary(context, call)

    async def stream_create(
        self, data: bytes, context: Context
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse | bytes]:
        """StreamCreate untracked: its parts in a generator of their own (tracked, Service.track
        hands InFlight.stream the parts, which runs them in its generator instead)."""
        async for event in _run_stream(self._stream_create, data, context):
            yield event

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(
            SERVICE,
            {
                "Create": unary(self.create),
                "CountTokens": unary(self.count_tokens),
                "StreamCreate": server_stream(self.stream_create),
            },
            refused=metrics.record_refused,  # the drain refuses a call before these methods run
            parts={"StreamCreate": self._stream_create},  # tracked, InFlight.stream runs these
        )


class StreamCreate:
    """StreamCreate in parts (`server.inflight.StreamParts`): InFlight.stream runs them in its own
    generator, so each delta passes one generator layer fewer (two frame resumptions a chunk).
    A failure after some deltas went out still ends the call with its status (never OK): the
    caller can tell a broken answer from a complete one."""

    __slots__ = ("_gateway", "_auth")

    def __init__(self, gateway: Gateway, auth: Authenticator) -> None:
        self._gateway = gateway
        self._auth = auth

    def scope(self, context: Context) -> metrics.RequestScope:
        return metrics.RequestScope("StreamCreate", "stream", context)

    async def open(
        self, data: bytes, context: Context, scope: metrics.RequestScope
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse | bytes]:
        actor = await self._auth.actor_for(context)
        request = parse(chat_pb2.CreateRequest, data)
        scope.labels(request.llm_config, proves=not wants_routing(request))
        # The usual delta comes as its wire bytes (the response serializer sends them).
        return self._gateway.stream_wire(request, actor, deadline_of(context))

    def failure(self, exc: Exception, context: Context) -> GatewayError:
        return map_exception(exc, "ChatCompletionServicer.stream_create", context)


async def _run_stream(
    parts: StreamCreate, data: bytes, context: Context
) -> AsyncIterator[chat_pb2.StreamCreateResponse | bytes]:
    """The parts in one generator of their own: the call as it runs without InFlight."""
    with parts.scope(context) as scope:
        try:
            async for event in await parts.open(data, context, scope):
                yield event
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence, as in run_unary
            error = parts.failure(exc, context)
        else:
            return
        try:
            await abort(context, error)
        finally:
            del error  # as in run_unary: the error's traceback holds this frame (a cycle)
