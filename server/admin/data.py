"""What the console shows, read through the trace reader and shaped for the pages and the JSON API.

Filters come from query strings and are checked here (lengths, allowed values), then handed to
the backend as a `TraceQuery` scoped exactly as `ProviderTraceService` scopes it
(`readable_owner`). The overview's numbers are computed from `TracePoint`s in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from server.api.traces import MAX_FILTER_CHARS, readable_owner
from server.auth.actor import Actor
from server.errors import InvalidRequest
from server.traces.base import (
    MAX_POINTS,
    STATUSES,
    TraceBackend,
    TracePoint,
    TraceQuery,
    TraceRecord,
    page_token,
    parse_page_token,
)

PAGE_SIZE = 50
FILTERS = ("model", "provider", "error_type", "status", "step_id", "run_id", "agent_id", "tag")
# Window -> (length, bucket): about 60-170 points a chart.
WINDOWS: dict[str, tuple[timedelta, timedelta]] = {
    "hour": (timedelta(hours=1), timedelta(minutes=1)),
    "day": (timedelta(days=1), timedelta(minutes=15)),
    "week": (timedelta(days=7), timedelta(hours=1)),
}
TOP_MODELS = 8  # token series charted one per model; the rest summed as "other"


def _text(params: Mapping[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if len(value) > MAX_FILTER_CHARS:
        raise InvalidRequest(f"{name} is too long", metadata={"field": name, "limit": str(MAX_FILTER_CHARS)})
    return value


def _time(params: Mapping[str, str], name: str) -> datetime | None:
    raw = _text(params, name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequest(f"{name} is not an ISO 8601 time", metadata={"field": name}) from exc
    value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        # In UTC, as the stores keep it: an offset that moves it beyond year 1..9999 would make
        # Postgres' driver fail the query (a 500), not answer it.
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidRequest(f"{name} is out of range", metadata={"field": name}) from exc


@dataclass(frozen=True, slots=True)
class ListFilters:
    """The trace list's filters as given (echoed into the form and the next-page link)."""

    values: dict[str, str] = field(default_factory=dict)
    start: datetime | None = None
    end: datetime | None = None
    before: tuple[datetime, str] | None = None


def parse_filters(params: Mapping[str, str]) -> ListFilters:
    values = {name: _text(params, name) for name in FILTERS}
    if values["status"] not in STATUSES:
        raise InvalidRequest("status must be ok, error or empty", metadata={"field": "status"})
    values["start"] = _text(params, "start")
    values["end"] = _text(params, "end")
    before = None
    token = _text(params, "page")
    if token:
        try:
            before = parse_page_token(token)
        except ValueError as exc:
            raise InvalidRequest(
                "page is not a token this server issued", metadata={"field": "page"}
            ) from exc
    return ListFilters(values, _time(params, "start"), _time(params, "end"), before)


def _query(actor: Actor, filters: ListFilters, *, limit: int) -> TraceQuery:
    v = filters.values
    return TraceQuery(
        organization_id=actor.organization_id,
        owner=readable_owner(actor),
        step_id=v["step_id"],
        run_id=v["run_id"],
        agent_id=v["agent_id"],
        model=v["model"],
        provider=v["provider"],
        error_type=v["error_type"],
        status=v["status"],
        tag=v["tag"],
        start_time=filters.start,
        end_time=filters.end,
        before=filters.before,
        limit=limit,
    )


@dataclass(slots=True)
class TracePage:
    traces: list[TraceRecord]
    next_page: str  # "" on the last page


async def list_traces(reader: TraceBackend, actor: Actor, filters: ListFilters) -> TracePage:
    """One page of the trace list, newest first (the texts are not needed, but a row is small)."""
    records = await reader.list(query=_query(actor, filters, limit=PAGE_SIZE + 1))
    more = len(records) > PAGE_SIZE
    records = records[:PAGE_SIZE]
    return TracePage(records, page_token(records[-1]) if more and records else "")


async def get_trace(reader: TraceBackend, actor: Actor, trace_id: str) -> TraceRecord | None:
    """The trace `trace_id` if `actor` may read it (another organization's or user's: None)."""
    if not trace_id or len(trace_id) > MAX_FILTER_CHARS:
        return None
    query = TraceQuery(
        organization_id=actor.organization_id, owner=readable_owner(actor), trace_id=trace_id, limit=1
    )
    records = await reader.list(query=query)
    return records[0] if records else None


def trace_summary(record: TraceRecord) -> dict[str, Any]:
    """A trace list row as JSON (no request or answer text)."""
    return {
        "id": record.id,
        "created_at": record.created_at.isoformat(),
        "provider": record.provider,
        "model": record.model,
        "step_id": record.step_id,
        "run_id": record.run_id,
        "agent_id": record.agent_id,
        "agent_tags": list(record.agent_tags),
        "error_type": record.error_type,
        "latency_ms": round(record.latency_ms, 3),
        "time_to_first_token_ms": round(record.time_to_first_token_ms, 3),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
    }


def trace_detail(record: TraceRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["created_at"] = record.created_at.isoformat()
    out.pop("owner", None)  # who may read it is the server's business
    return out


# -- the overview ------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return round(sorted_values[rank - 1], 3)


def summarize(
    points: Sequence[TracePoint], *, start: datetime, end: datetime, bucket: timedelta
) -> dict[str, Any]:
    """Per-bucket series (requests and errors per minute, p50/p99 latency and TTFT, tokens by
    model) and per (provider, model) totals. Pure; runs in a thread."""
    start_us = int(start.timestamp() * 1_000_000)
    bucket_us = int(bucket.total_seconds() * 1_000_000)
    count = max(1, math.ceil((end - start) / bucket))
    minutes = bucket.total_seconds() / 60.0
    requests = [0] * count
    errors = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    ttfts: list[list[float]] = [[] for _ in range(count)]
    model_tokens: dict[str, int] = {}
    tokens_by_bucket: dict[str, list[int]] = {}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    group_latency: dict[tuple[str, str], list[float]] = {}
    for p in points:
        index = (p.created_at_us - start_us) // bucket_us
        if not 0 <= index < count:
            continue
        requests[index] += 1
        tokens = p.prompt_tokens + p.completion_tokens
        key = (p.provider, p.model)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "provider": p.provider, "model": p.model, "requests": 0, "errors": 0,
                "prompt_tokens": 0, "completion_tokens": 0,
            }  # fmt: skip
            group_latency[key] = []
        group["requests"] += 1
        group["prompt_tokens"] += p.prompt_tokens
        group["completion_tokens"] += p.completion_tokens
        if p.error_type:
            errors[index] += 1
            group["errors"] += 1
        else:
            latencies[index].append(p.latency_ms)
            group_latency[key].append(p.latency_ms)
            if p.time_to_first_token_ms > 0:
                ttfts[index].append(p.time_to_first_token_ms)
        model_tokens[p.model] = model_tokens.get(p.model, 0) + tokens
        series = tokens_by_bucket.get(p.model)
        if series is None:
            series = tokens_by_bucket[p.model] = [0] * count
        series[index] += tokens
    top = sorted(model_tokens, key=lambda m: (-model_tokens[m], m))[:TOP_MODELS]
    token_series = {model: tokens_by_bucket[model] for model in top}
    rest = [m for m in tokens_by_bucket if m not in token_series]
    if rest:
        token_series["(other models)"] = [sum(tokens_by_bucket[m][i] for m in rest) for i in range(count)]
    for values in (*latencies, *ttfts):
        values.sort()
    table = []
    for key, group in sorted(groups.items(), key=lambda item: (-item[1]["requests"], item[0])):
        values = sorted(group_latency[key])
        table.append({**group, "p50_ms": _percentile(values, 0.5), "p99_ms": _percentile(values, 0.99)})
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "bucket_seconds": int(bucket.total_seconds()),
        "times": [(start_us + i * bucket_us) // 1_000_000 for i in range(count)],
        "requests_per_minute": [round(r / minutes, 4) for r in requests],
        "errors_per_minute": [round(e / minutes, 4) for e in errors],
        "latency_p50_ms": [_percentile(v, 0.5) for v in latencies],
        "latency_p99_ms": [_percentile(v, 0.99) for v in latencies],
        "ttft_p50_ms": [_percentile(v, 0.5) for v in ttfts],
        "ttft_p99_ms": [_percentile(v, 0.99) for v in ttfts],
        "tokens": token_series,
        "by_model": table,
        "traces": sum(requests),
        "errors": sum(errors),
        "capped": len(points) >= MAX_POINTS,
    }


async def overview(
    reader: TraceBackend, actor: Actor, window: str, *, now: datetime | None = None
) -> dict[str, Any]:
    if window not in WINDOWS:
        raise InvalidRequest("window must be hour, day or week", metadata={"field": "window"})
    length, bucket = WINDOWS[window]
    end = now or datetime.now(UTC)
    # Whole buckets: the last one ends at the next bucket boundary after now.
    bucket_us = int(bucket.total_seconds() * 1_000_000)
    end_us = (int(end.timestamp() * 1_000_000) // bucket_us + 1) * bucket_us
    end = datetime.fromtimestamp(end_us / 1_000_000, UTC)
    start = end - length
    query = TraceQuery(
        organization_id=actor.organization_id,
        owner=readable_owner(actor),
        start_time=start,
        end_time=end,
        limit=MAX_POINTS,
    )
    points = await reader.points(query=query)
    summary = await asyncio.to_thread(summarize, points, start=start, end=end, bucket=bucket)
    summary["window"] = window
    return summary


# -- one trace as a conversation ---------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # pretty-printed when it is JSON, else as given
    id: str = ""


@dataclass(slots=True)
class ChatItem:
    role: str
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""
    name: str = ""


def pretty_json(text: str) -> str:
    """`text` re-indented when it is JSON, else unchanged."""
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, TypeError):
        return text


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None


def _content_text(content: Any) -> tuple[str, str, list[ToolCall], str]:
    """(text, reasoning, tool calls, tool result id) of an OpenAI or Anthropic content value."""
    if content is None:
        return "", "", [], ""
    if isinstance(content, str):
        return content, "", [], ""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    result_id = ""
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type", "")
        if kind in ("text", "input_text", "output_text") or (not kind and "text" in part):
            texts.append(str(part.get("text", "")))
        elif kind in ("thinking", "reasoning"):
            reasoning.append(str(part.get("thinking") or part.get("text") or ""))
        elif kind == "tool_use":
            calls.append(
                ToolCall(str(part.get("name", "")), _json_text(part.get("input")), str(part.get("id", "")))
            )
        elif kind == "tool_result":
            result_id = str(part.get("tool_use_id", ""))
            inner, _, _, _ = _content_text(part.get("content"))
            texts.append(inner)
        elif kind == "image_url" or kind == "image":
            texts.append("[image]")
    return "\n".join(t for t in texts if t), "\n".join(reasoning), calls, result_id


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return pretty_json(value)
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _openai_message(message: Mapping[str, Any]) -> ChatItem:
    text, reasoning, calls, result_id = _content_text(message.get("content"))
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str) and message[key]:
            reasoning = message[key]
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            function = call.get("function") or {}
            calls.append(
                ToolCall(
                    str(function.get("name", "")),
                    _json_text(function.get("arguments", "")),
                    str(call.get("id", "")),
                )
            )
    role = str(message.get("role", ""))
    if role == "user" and result_id:
        role = "tool"
    return ChatItem(
        role=role,
        text=text,
        reasoning=reasoning,
        tool_calls=calls,
        tool_call_id=str(message.get("tool_call_id", "") or result_id),
        name=str(message.get("name", "") or ""),
    )


def _gemini_content(content: Mapping[str, Any]) -> ChatItem:
    role = {"model": "assistant"}.get(str(content.get("role", "")), str(content.get("role", "")))
    item = ChatItem(role=role or "assistant")
    texts: list[str] = []
    for part in content.get("parts") or ():
        if not isinstance(part, dict):
            continue
        if part.get("thought") and "text" in part:
            item.reasoning += str(part["text"])
        elif "text" in part:
            texts.append(str(part["text"]))
        elif "functionCall" in part:
            call = part["functionCall"] or {}
            item.tool_calls.append(ToolCall(str(call.get("name", "")), _json_text(call.get("args", {}))))
        elif "functionResponse" in part:
            item.role = "tool"
            response = part["functionResponse"] or {}
            item.name = str(response.get("name", ""))
            texts.append(_json_text(response.get("response", {})))
    item.text = "\n".join(texts)
    return item


def conversation(record: TraceRecord) -> list[ChatItem]:
    """The prompt's messages then the answer's, in order, from the stored request and response
    (OpenAI-shaped; Anthropic and Gemini bodies too)."""
    items: list[ChatItem] = []
    request = _loads(record.request_json)
    if isinstance(request, dict):
        system = request.get("system")
        if system:
            text = system if isinstance(system, str) else _content_text(system)[0]
            items.append(ChatItem(role="system", text=text))
        instruction = request.get("systemInstruction") or request.get("system_instruction")
        if isinstance(instruction, dict):
            items.append(ChatItem(role="system", text=_gemini_content(instruction).text))
        for message in request.get("messages") or ():
            if isinstance(message, dict):
                items.append(_openai_message(message))
        for content in request.get("contents") or ():
            if isinstance(content, dict):
                items.append(_gemini_content(content))
    response = _loads(record.response_json)
    if isinstance(response, dict):
        for choice in response.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                item = _openai_message(choice["message"])
                item.role = item.role or "assistant"
                items.append(item)
        if response.get("type") == "message" and "content" in response:
            text, reasoning, calls, _ = _content_text(response["content"])
            items.append(ChatItem(role="assistant", text=text, reasoning=reasoning, tool_calls=calls))
        for candidate in response.get("candidates") or ():
            if isinstance(candidate, dict) and isinstance(candidate.get("content"), dict):
                items.append(_gemini_content(candidate["content"]))
    return items
