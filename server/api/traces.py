"""ProviderTraceService: read traces from the first configured backend, scoped to the caller.

Answers are bounded in bytes (`page_bytes`, LLMGW_TRACE_PAGE_BYTES), below what gRPC can send:
a page ends early (with a next_page_token) before the trace that would cross the bound, and a
single trace larger than the bound comes back with its long texts cut and `truncated` set.
"""

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
from server.routing.attempts import route_attempts
from server.traces.base import (
    TraceBackend,
    TraceQuery,
    TraceRecord,
    page_token,
    parse_page_token,
    record_bytes,
    trace_owner,
)

SERVICE = "llmgateway.v1.ProviderTraceService"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# The default client receive limit of every gRPC implementation: pages fit any client as it is.
DEFAULT_PAGE_BYTES = 4 * 1024 * 1024
# Ids and tokens are short; longer filters would only make a store's query fail (ClickHouse
# caps a query at 256 KiB) or scan for nothing.
MAX_FILTER_CHARS = 4096
# The fields a trace too big for a page is cut in; field numbers below 16: one-byte tags.
_TRUNCATABLE = ("request_json", "response_json", "error_message")
_FIELD_FRAME = 6  # a one-byte tag and a length of up to five bytes
_PAGE_FRAME = 128  # the response's next_page_token, framed


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
            cache_write_tokens=record.cache_write_tokens,
            cost_usd=record.cost_usd or "",  # unpriced: empty, never "0"
        ),
        latency_ms=record.latency_ms,
        time_to_first_token_ms=record.time_to_first_token_ms,
        created_at=created,
        notes=record.notes,
        route=record.route,
        deployment=record.deployment,
        attempts=route_attempts(record.attempts_json),
    )


def _framed(size: int) -> int:
    return size + _FIELD_FRAME


# Cut only when a trace's metadata alone does not fit (stored before the write path bounded it).
_METADATA = (
    "step_id", "agent_id", "run_id", "user_id", "call_type", "model", "provider",
    "model_endpoint_type", "error_type",
)  # fmt: skip


def _share(cut: traces_pb2.ProviderTrace, texts: dict[str, bytes], room: int) -> int:
    """Set the fields of `texts` on `cut`, each cut to a fair share of `room`; the room left.

    A text shorter than its share keeps it whole and leaves the rest to the others. Cuts fall on
    UTF-8 character boundaries.
    """
    left = len(texts)
    for name in sorted(texts, key=lambda n: len(texts[n])):
        share = max(room, 0) // left
        text = texts[name]
        taken = text[: min(len(text), share)]
        setattr(cut, name, taken.decode(errors="ignore"))  # drops a split last character
        room -= len(taken)
        left -= 1
    return room


def _cut_metadata(cut: traces_pb2.ProviderTrace, budget: int) -> None:
    """Cut `cut`'s ids and tags (never its id, organization or times) to leave room in `budget`."""
    strings = {name: getattr(cut, name).encode() for name in _METADATA}
    tags = list(cut.agent_tags)
    for name in _METADATA:
        cut.ClearField(name)
    del cut.agent_tags[:]
    room = budget - cut.ByteSize() - _FIELD_FRAME * len(_METADATA)
    # Half the room at most for the ids, then whole tags while they fit in half of what is left.
    room = _share(cut, strings, room // 2) + room - room // 2
    tag_room = room // 2
    for tag in tags:
        size = _framed(len(tag.encode()))
        if size > tag_room:
            break
        cut.agent_tags.append(tag)
        tag_room -= size


def truncate(trace: traces_pb2.ProviderTrace, budget: int) -> traces_pb2.ProviderTrace:
    """`trace` cut to at most `budget` serialized bytes: the long texts keep their beginnings.

    The room left by the other fields is shared fairly (`_share`). When the other fields alone do
    not fit, the ids and tags are cut too (`_cut_metadata`).
    """
    texts = {name: getattr(trace, name).encode() for name in _TRUNCATABLE}
    cut = traces_pb2.ProviderTrace()
    cut.CopyFrom(trace)
    for name in _TRUNCATABLE:
        cut.ClearField(name)
    cut.truncated = True
    frames = _FIELD_FRAME * len(_TRUNCATABLE)
    if cut.ByteSize() + frames > budget:
        _cut_metadata(cut, budget - frames)
    room = budget - cut.ByteSize() - frames
    if room < 0:  # only with a page bound far below any real trace's metadata
        raise FailedPrecondition(
            f"trace {trace.id} does not fit in {budget} bytes even without its texts; "
            "raise LLMGW_TRACE_PAGE_BYTES",
            metadata={"trace_id": trace.id, "size": str(trace.ByteSize()), "limit": str(budget)},
        )
    _share(cut, texts, room)
    return cut


def fit_page(records: list[TraceRecord], budget: int) -> list[traces_pb2.ProviderTrace]:
    """The traces of `records` that fit in `budget` bytes, in order; the first one always (cut)."""
    page: list[traces_pb2.ProviderTrace] = []
    total = _PAGE_FRAME
    for record in records:
        proto = trace_to_proto(record)
        size = _framed(proto.ByteSize())
        if total + size > budget:
            if not page:
                page.append(truncate(proto, budget - total - _FIELD_FRAME))
            break
        page.append(proto)
        total += size
    return page


def decode_page_token(token: str) -> tuple[datetime, str]:
    if len(token) > MAX_FILTER_CHARS:
        raise InvalidRequest("page_token is not one this server issued", metadata={"field": "page_token"})
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


def _check_filter(field: str, value: str) -> None:
    if len(value) > MAX_FILTER_CHARS:
        raise InvalidRequest(
            f"{field} is longer than {MAX_FILTER_CHARS} characters",
            metadata={"field": field, "limit": str(MAX_FILTER_CHARS), "length": str(len(value))},
        )


class ProviderTraceServicer:
    def __init__(
        self, reader: TraceBackend | None, auth: KeyAuthenticator, *, page_bytes: int = DEFAULT_PAGE_BYTES
    ) -> None:
        self._reader = reader
        self._auth = auth
        self._page_bytes = page_bytes

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
            _check_filter("step_id", request.step_id)
            record = await self._readable().get_latest(
                organization_id=actor.organization_id,
                step_id=request.step_id,
                owner=readable_owner(actor),
            )
            if record is None:
                raise NotFound(
                    f"no trace for step {request.step_id!r}", metadata={"step_id": request.step_id}
                )
            trace = trace_to_proto(record)
            budget = self._page_bytes - _FIELD_FRAME
            if trace.ByteSize() > budget:
                trace = truncate(trace, budget)
            return traces_pb2.GetProviderTraceResponse(trace=trace)

        return await run_unary(context, call)

    async def list(self, data: bytes, context: Context) -> traces_pb2.ListProviderTracesResponse:
        async def call() -> traces_pb2.ListProviderTracesResponse:
            actor = await self._auth.actor_for(context)
            request = parse(traces_pb2.ListProviderTracesRequest, data)
            if request.page_size < 0:
                raise InvalidRequest("page_size must not be negative", metadata={"field": "page_size"})
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            for field in ("step_id", "run_id", "agent_id"):
                _check_filter(field, getattr(request, field))
            query = TraceQuery(
                organization_id=actor.organization_id,
                owner=readable_owner(actor),
                step_id=request.step_id,
                run_id=request.run_id,
                agent_id=request.agent_id,
                start_time=_time(request.start_time, request.HasField("start_time")),
                end_time=_time(request.end_time, request.HasField("end_time")),
                limit=size + 1,  # one more tells whether another page exists
                max_bytes=self._page_bytes,  # the store stops reading past one page of bytes
                before=decode_page_token(request.page_token) if request.page_token else None,
            )
            records = await self._readable().list(query=query)
            page = fit_page(records[:size], self._page_bytes)
            # More may follow when the page ended before the rows read did, or when the store
            # stopped reading at the byte bound.
            more = len(page) < len(records) or sum(map(record_bytes, records)) >= self._page_bytes
            token = page_token(records[len(page) - 1]) if page and more else ""
            return traces_pb2.ListProviderTracesResponse(traces=page, next_page_token=token)

        return await run_unary(context, call)

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(SERVICE, {"GetProviderTrace": unary(self.get), "ListProviderTraces": unary(self.list)})
