"""ProviderTraceService: read traces from the first configured backend, scoped to the caller."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2
from llmgateway.v1 import chat_pb2, traces_pb2

from server.api.auth import KeyAuthenticator
from server.api.context import Context, parse, run_unary
from server.api.handlers import service, unary
from server.auth.actor import Actor
from server.errors import FailedPrecondition, InvalidRequest, NotFound
from server.traces.base import (
    TraceBackend,
    TraceQuery,
    TraceRecord,
    page_token,
    parse_page_token,
    trace_owner,
)

SERVICE = "llmgateway.v1.ProviderTraceService"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def trace_to_proto(record: TraceRecord) -> traces_pb2.ProviderTrace:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(record.created_at)
    return traces_pb2.ProviderTrace(
        id=record.id,
        step_id=record.step_id,
        agent_id=record.agent_id,
        agent_tags=record.agent_tags,
        run_id=record.run_id,
        call_type=record.call_type,
        organization_id=record.organization_id,
        user_id=record.user_id,
        provider=record.provider,
        model=record.model,
        model_endpoint_type=record.model_endpoint_type,
        is_byok=record.is_byok,
        request_json=record.request_json,
        response_json=record.response_json,
        error_type=record.error_type,
        error_message=record.error_message,
        usage=chat_pb2.Usage(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            total_tokens=record.total_tokens,
            cached_tokens=record.cached_tokens,
            reasoning_tokens=record.reasoning_tokens,
        ),
        latency_ms=record.latency_ms,
        time_to_first_token_ms=record.time_to_first_token_ms,
        created_at=created,
    )


def decode_page_token(token: str) -> tuple[datetime, str]:
    try:
        return parse_page_token(token)
    except ValueError as exc:
        raise InvalidRequest(
            "page_token is not one this server issued", metadata={"field": "page_token"}
        ) from exc


def readable_owner(actor: Actor) -> str | None:
    """Whose traces `actor` may read: None for the whole organization (admins, auth off).

    A non-admin key reads the traces of its own user, or, when it has no user, those it made.
    """
    if actor.is_admin:
        return None
    return trace_owner(user_id=actor.user_id, key_id=actor.key_id)


def _time(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return value.ToDatetime(tzinfo=UTC) if present else None


class ProviderTraceServicer:
    def __init__(self, reader: TraceBackend | None, auth: KeyAuthenticator) -> None:
        self._reader = reader
        self._auth = auth

    def _readable(self) -> TraceBackend:
        if self._reader is None or not self._reader.readable:
            name = self._reader.name if self._reader is not None else "none"
            raise FailedPrecondition(
                f"the first trace backend ({name}) is write-only; "
                "put a readable one first in LLMGW_TRACE_BACKENDS",
                metadata={"backend": name},
            )
        return self._reader

    async def get(self, data: bytes, context: Context) -> traces_pb2.GetProviderTraceResponse:
        async def call() -> traces_pb2.GetProviderTraceResponse:
            actor = await self._auth.actor_for(context)
            request = parse(traces_pb2.GetProviderTraceRequest, data)
            if not request.step_id:
                raise InvalidRequest("step_id is required", metadata={"field": "step_id"})
            record = await self._readable().get_latest(
                organization_id=actor.organization_id,
                step_id=request.step_id,
                owner=readable_owner(actor),
            )
            if record is None:
                raise NotFound(
                    f"no trace for step {request.step_id!r}", metadata={"step_id": request.step_id}
                )
            return traces_pb2.GetProviderTraceResponse(trace=trace_to_proto(record))

        return await run_unary(context, call)

    async def list(self, data: bytes, context: Context) -> traces_pb2.ListProviderTracesResponse:
        async def call() -> traces_pb2.ListProviderTracesResponse:
            actor = await self._auth.actor_for(context)
            request = parse(traces_pb2.ListProviderTracesRequest, data)
            if request.page_size < 0:
                raise InvalidRequest("page_size must not be negative", metadata={"field": "page_size"})
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            query = TraceQuery(
                organization_id=actor.organization_id,
                owner=readable_owner(actor),
                step_id=request.step_id,
                run_id=request.run_id,
                agent_id=request.agent_id,
                start_time=_time(request.start_time, request.HasField("start_time")),
                end_time=_time(request.end_time, request.HasField("end_time")),
                limit=size + 1,  # one more tells whether another page exists
                before=decode_page_token(request.page_token) if request.page_token else None,
            )
            records = await self._readable().list(query=query)
            page = records[:size]
            token = page_token(page[-1]) if len(records) > size else ""
            return traces_pb2.ListProviderTracesResponse(
                traces=[trace_to_proto(r) for r in page], next_page_token=token
            )

        return await run_unary(context, call)

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(SERVICE, {"GetProviderTrace": unary(self.get), "ListProviderTraces": unary(self.list)})
