"""Anthropic Messages API (`POST {base}/messages`, `anthropic-version: 2023-06-01`) <-> the
gateway's internal OpenAI Chat Completions shape. Pure translation: no I/O, no gateway import.

Request (`build_body_with_notes`; the second value names every parameter not sent as given, for
the trace):
- system/developer messages, wherever they stand, become the top-level `system` text blocks
  in order (Anthropic has no system turns).
- user/assistant/tool turns become content blocks; tool results are `tool_result` blocks of a
  user turn; adjacent turns of one role are merged, so roles strictly alternate and consecutive
  tool results share one user turn. Empty assistant turns (no text, no calls) are left out.
- images: data URLs -> base64 source (jpeg/png/gif/webp), http(s) URLs -> url source; `detail`
  has no Anthropic equivalent and is ignored.
- tools -> {name, description, input_schema}; OpenAI's `strict` is dropped (the strict-form
  schema itself is valid JSON Schema and passes through). Legacy `functions`/`function_call`
  are read the same way.
- tool_choice: auto -> auto, required -> any, named -> tool, none -> none;
  parallel_tool_calls false -> disable_parallel_tool_use (not with none, where it means nothing).
- max_tokens = max_completion_tokens, else DEFAULT_MAX_TOKENS (Anthropic requires it); with
  thinking and no caller value, the thinking budget plus DEFAULT_MAX_TOKENS.
- reasoning_effort -> thinking {"type": "enabled", budget_tokens: THINKING_BUDGETS[effort]}.
  The budget must be >= 1024 and below max_tokens: a caller max_tokens caps it at half
  (max_tokens counts thinking too, as OpenAI's max_completion_tokens counts reasoning); under
  1024 thinking is dropped. Thinking is also dropped when a tool is forced (Anthropic accepts
  only auto/none with thinking; the forcing is what agents rely on, and dropping thinking does
  not change the answer's shape).
- temperature: clamped to Anthropic's 0..1; dropped with thinking (not allowed). top_p: sent;
  dropped with thinking below 0.95 (the range Anthropic allows with thinking). stop ->
  stop_sequences; user -> metadata.user_id.
- response_format json_schema on Claude 4.5 and later: `output_config.format` {type:
  json_schema, schema} (structured outputs, GA: the text answer is JSON matching the schema).
- response_format json_object, or json_schema on older models (no JSON mode there): the
  schema is offered as a tool named RESPONSE_TOOL_PREFIX + schema name and forced (or, beside
  the caller's tools under tool_choice auto, `any`); the answer's call to it comes back as the
  message content (finish "stop"). With required/named forcing the answer is a tool call
  anyway (as with OpenAI), so response_format is dropped.
- seed, frequency_penalty, presence_penalty (and any unknown key) are dropped: not Anthropic
  parameters. stream_options is dropped silently: Anthropic streams usage unasked.
- assistant `thinking_blocks` (thinking with signature, redacted_thinking) go first in the
  turn's content, unchanged; blocks of another provider's types are left out.

Response: text -> content, tool_use -> tool_calls (arguments = JSON of input), thinking ->
reasoning_content, thinking + redacted_thinking -> thinking_blocks. stop_reason: end_turn,
stop_sequence, pause_turn -> stop; max_tokens, model_context_window_exceeded -> length;
tool_use -> tool_calls; refusal -> content_filter with `refusal`. Usage: prompt_tokens =
input + cache reads + cache writes, cached_tokens = cache reads, cache_write_tokens = cache
writes, reasoning_tokens = output_tokens_details.thinking_tokens.

Stream: `StreamDecoder` turns the documented SSE events into OpenAI chunks; one finish chunk
with the final (cumulative, never summed) usage is emitted at message_stop, then None.

Errors: `error_for_status` maps HTTP statuses and `error.type`; 529 overloaded_error is retried
as a 503 would be (the retry policy lists standard statuses; metadata keeps 529). "prompt is too
long" and "input length and `max_tokens` exceed context limit" are CONTEXT_WINDOW_EXCEEDED.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.core.retry import RetryableError, parse_retry_after
from server.errors import (
    ContextWindowExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.providers.errors import not_found_error, upstream_message
from server.providers.openai_compat import MAX_EVENT_BYTES

NAME = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com/v1"
API_VERSION = "2023-06-01"
# Every current Claude model can write this many tokens; the API refuses a request without one.
DEFAULT_MAX_TOKENS = 4096
MIN_THINKING_BUDGET = 1024  # the API's floor
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384}
# Anthropic's ceiling is 1.0 where OpenAI's is 2.0.
MAX_TEMPERATURE = 1.0
# With thinking on, Anthropic accepts top_p only in [0.95, 1].
MIN_TOP_P_WITH_THINKING = 0.95
# The tool a JSON response format is emulated with; its call comes back as the content.
RESPONSE_TOOL_PREFIX = "json_response__"
_MAX_TOOL_NAME = 64
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.DOTALL)
_TOO_LONG = re.compile(r"prompt is too long(?::\s*(\d+)\s*tokens?\s*>\s*(\d+))?", re.IGNORECASE)
# Anthropic counts max_tokens against the window too: "input length and `max_tokens` exceed
# context limit: 178959 + 64000 > 200000, decrease input length or `max_tokens` and try again".
_OVER_LIMIT = re.compile(
    r"input length and `?max_tokens`? exceed context limit:\s*(\d+)\s*\+\s*(\d+)\s*>\s*(\d+)", re.IGNORECASE
)
# Keys build_body reads; anything else in the body is not an Anthropic parameter.
_HANDLED = frozenset(
    {
        "model", "messages", "tools", "functions", "tool_choice", "function_call",
        "parallel_tool_calls", "max_completion_tokens", "max_tokens", "temperature", "top_p",
        "reasoning_effort", "response_format", "stop", "user", "stream", "stream_options",
    }
)  # fmt: skip
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Error types as the HTTP status they stand for (an `error` SSE event arrives after a 200).
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_OVERLOADED = 529
# How the retry loop sees a 529: its policy lists the standard statuses, and 503 is the one
# that means "overloaded, come back later".
_OVERLOADED_RETRY_STATUS = 503


def endpoint_url(base_url: str, model: str, *, stream: bool) -> str:
    """The Messages endpoint: one URL for both modes (the model is in the body)."""
    return f"{base_url}/messages"


def auth_headers(api_key: str) -> dict[str, str]:
    return {"x-api-key": api_key, "anthropic-version": API_VERSION, "content-type": "application/json"}


# -- request ---------------------------------------------------------------------------------


def _invalid(path: str, description: str, **metadata: object) -> InvalidRequest:
    return InvalidRequest(
        f"{path} {description} (anthropic)",
        metadata={"provider": NAME, "field": path, **metadata},
        field_violations=[FieldViolation(path, description)],
    )


def build_body(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    return build_body_with_notes(body, stream=stream)[0]


def build_body_with_notes(body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
    """The Messages API body for the OpenAI-shaped `body` (not mutated), and the names of the
    parameters dropped or changed on the way."""
    notes = [key for key in body if key not in _HANDLED]
    system, messages = _convert_messages(body.get("messages") or [])
    tools = _convert_tools(body)
    choice = _tool_choice(body, bool(tools), notes)
    output_format = _native_output_format(body)
    if output_format is None:
        tools, choice = _response_format(body.get("response_format"), tools, choice, notes)
    forced = choice is not None and choice["type"] in ("any", "tool")
    budget = _thinking_budget(body, forced, notes)
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": _max_tokens(body, budget)}
    if system:
        out["system"] = system
    out["messages"] = messages
    if tools:
        out["tools"] = tools
    if choice is not None:
        out["tool_choice"] = choice
    if budget is not None:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    _sampling(body, out, thinking=budget is not None, notes=notes)
    if output_format is not None:
        out["output_config"] = {"format": output_format}
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    if stream:
        out["stream"] = True
    return out, notes


def _text_of(content: Any, path: str) -> str:
    """The text of a system message or tool result: a string or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for k, part in enumerate(content):
        if part.get("type") != "text":
            raise _invalid(f"{path}.content[{k}]", "must be a text part here")
        texts.append(part.get("text") or "")
    return "".join(texts)


def _convert_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        path = f"messages[{i}]"
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), path)
            if text:  # the API refuses empty text blocks
                system.append({"type": "text", "text": text})
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), path)
        elif role == "assistant":
            blocks = _assistant_blocks(message, path)
        elif role == "tool":
            blocks = [_tool_result(message, path)]
            role = "user"
        else:
            raise _invalid(f"{path}.role", "must be system, developer, user, assistant or tool")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise _invalid("messages", "must hold at least one user or assistant message")
    return system, turns


def _user_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for k, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url") or {}, f"{path}.content[{k}]"))
        else:
            raise _invalid(f"{path}.content[{k}].type", "must be text or image_url", type=kind)
    return blocks


def _image(image: dict[str, Any], path: str) -> dict[str, Any]:
    url = str(image.get("url") or "")
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _invalid(f"{path}.image_url.url", "must be an http(s) URL or a base64 data URL")
    media_type = match.group(1).lower()
    if media_type not in _IMAGE_TYPES:
        raise _invalid(
            f"{path}.image_url.url", "must be a JPEG, PNG, GIF or WebP image", media_type=media_type
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": match.group(2)}}


def _assistant_blocks(message: dict[str, Any], path: str) -> list[dict[str, Any]]:
    # Anthropic wants the thinking that led to an answer back first, exactly as it was sent.
    blocks = [
        block
        for block in message.get("thinking_blocks") or ()
        if isinstance(block, dict) and block.get("type") in ("thinking", "redacted_thinking")
    ]
    content = message.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif content:
        for k, part in enumerate(content):
            text = part.get("text") or part.get("refusal")
            if part.get("type") not in ("text", "refusal"):
                raise _invalid(f"{path}.content[{k}].type", "must be text in an assistant message")
            if text:
                blocks.append({"type": "text", "text": text})
    for j, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _tool_input(function.get("arguments"), f"{path}.tool_calls[{j}].function.arguments"),
            }
        )
    return blocks


def _tool_input(arguments: Any, path: str) -> dict[str, Any]:
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise _invalid(path, "must be a JSON object (Anthropic tool input)")
    return value


def _tool_result(message: dict[str, Any], path: str) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    text = _text_of(message.get("content"), path)
    if text:  # an empty result is sent without content rather than as an empty text
        result["content"] = text
    return result


def _convert_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    # The gateway's tool dicts are cached and shared: new dicts are built, none is mutated.
    if body.get("tools"):
        functions = [tool.get("function") or {} for tool in body["tools"]]
    else:
        functions = body.get("functions") or []
    return [_tool(function) for function in functions]


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": function.get("name")}
    if function.get("description"):
        tool["description"] = function["description"]
    tool["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return tool


def _tool_choice(body: dict[str, Any], has_tools: bool, notes: list[str]) -> dict[str, Any] | None:
    raw = body.get("tool_choice", body.get("function_call"))
    parallel_off = body.get("parallel_tool_calls") is False
    if not has_tools:
        notes.extend(key for key in ("tool_choice", "parallel_tool_calls") if key in body)
        return None
    choice: dict[str, Any]
    if raw is None or raw == "auto":
        if not parallel_off:
            return None  # auto is Anthropic's default
        choice = {"type": "auto"}
    elif raw == "required":
        choice = {"type": "any"}
    elif raw == "none":
        return {"type": "none"}
    elif isinstance(raw, dict):
        name = (raw.get("function") or {}).get("name") or raw.get("name")
        choice = {"type": "tool", "name": name}
    else:
        raise _invalid("tool_choice", "must be auto, required, none or a named function")
    if parallel_off:
        choice["disable_parallel_tool_use"] = True
    return choice


def _response_format(
    response_format: Any,
    tools: list[dict[str, Any]],
    choice: dict[str, Any] | None,
    notes: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Tools and tool_choice with a JSON response format emulated by a forced tool."""
    if not response_format or response_format.get("type") == "text":
        return tools, choice
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        name, schema = str(spec.get("name") or "response"), spec.get("schema") or {"type": "object"}
        description = spec.get("description") or "Give the answer as this tool's input."
    elif kind == "json_object":
        name, schema = "object", {"type": "object"}
        description = "Give the answer as a JSON object, this tool's input."
    else:
        raise _invalid("response_format.type", "must be text, json_object or json_schema", type=kind)
    if choice is not None and choice["type"] in ("any", "tool"):
        notes.append("response_format")  # the answer is a forced tool call: no content to shape
        return tools, choice
    tool_name = (RESPONSE_TOOL_PREFIX + name)[:_MAX_TOOL_NAME]
    offered = [*tools, {"name": tool_name, "description": description, "input_schema": schema}]
    parallel = (
        {"disable_parallel_tool_use": True} if choice and choice.get("disable_parallel_tool_use") else {}
    )
    if (tools and choice is None) or (choice is not None and choice["type"] == "auto"):
        return offered, {"type": "any", **parallel}  # a tool call or the answer, never free text
    return offered, {"type": "tool", "name": tool_name}


# Claude 4.5 and later take structured outputs natively (`output_config.format`, GA; Anthropic's
# "Structured outputs" guide); `claude-<family>-<major>[-<minor>]`, a date is not a minor.
_CLAUDE_VERSION = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:-(\d{1,2})(?!\d))?")
_STRUCTURED_OUTPUTS_SINCE = (4, 5)


def structured_outputs(model: str) -> bool:
    """Whether `model` takes `output_config.format` (JSON outputs constrained to a schema)."""
    match = _CLAUDE_VERSION.search(model)
    if match is None:
        return False
    version = (int(match.group(1)), int(match.group(2) or 0))
    return version >= _STRUCTURED_OUTPUTS_SINCE


def _native_output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`output_config.format` for a json_schema response format on a model that takes it; None
    means the tool emulation (`_response_format`): json_object has no native form, and models
    before Claude 4.5 have no structured outputs."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    if not structured_outputs(str(body.get("model") or "")):
        return None
    spec = response_format.get("json_schema") or {}
    return {"type": "json_schema", "schema": spec.get("schema") or {"type": "object"}}


def _thinking_budget(body: dict[str, Any], forced: bool, notes: list[str]) -> int | None:
    effort = body.get("reasoning_effort")
    if not effort:
        return None
    budget = THINKING_BUDGETS.get(effort)
    if budget is None:
        raise _invalid("reasoning_effort", "must be minimal, low, medium or high", reasoning_effort=effort)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        budget = min(budget, int(limit) // 2)
    if forced or budget < MIN_THINKING_BUDGET:
        notes.append("reasoning_effort")
        return None
    return budget


def _max_tokens(body: dict[str, Any], budget: int | None) -> int:
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        return int(limit)
    return DEFAULT_MAX_TOKENS + (budget or 0)


def _sampling(body: dict[str, Any], out: dict[str, Any], *, thinking: bool, notes: list[str]) -> None:
    temperature = body.get("temperature")
    if temperature is not None:
        if thinking or temperature > MAX_TEMPERATURE:
            notes.append("temperature")
        if not thinking:
            out["temperature"] = min(float(temperature), MAX_TEMPERATURE)
    top_p = body.get("top_p")
    if top_p is not None:
        if thinking and top_p < MIN_TOP_P_WITH_THINKING:
            notes.append("top_p")
        else:
            out["top_p"] = top_p
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)


# -- response --------------------------------------------------------------------------------


def _bad(message: str, **metadata: object) -> UpstreamBadResponse:
    return UpstreamBadResponse(f"anthropic answered {message}", metadata={"provider": NAME, **metadata})


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"a usage count that is not a count: {key}", field=f"usage.{key}")
    return value


def normalize_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic usage as OpenAI usage: prompt_tokens includes cache reads and writes."""
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    prompt = _count(usage, "input_tokens") + cache_read + cache_write
    completion = _count(usage, "output_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
        "cache_write_tokens": cache_write,
    }
    # The 1-hour writes are priced apart (2x input against 1.25x for 5-minute ones); a split
    # that claims more than the total is the upstream's error, not a price.
    split = usage.get("cache_creation")
    if isinstance(split, dict):
        one_hour = _count(split, "ephemeral_1h_input_tokens")
        if one_hour > cache_write:
            raise _bad("more 1-hour cache writes than cache writes", field="usage.cache_creation")
        out["cache_write_1h_tokens"] = one_hour
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and details.get("thinking_tokens") is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": _count(details, "thinking_tokens")}
    return out


def _finish_reason(stop_reason: Any, *, answered_by_tool: bool) -> str:
    reason = _FINISH.get(stop_reason, "stop")
    # The emulated JSON response format: its tool call is the content, so the answer stopped.
    return "stop" if reason == "tool_calls" and answered_by_tool else reason


def _refusal(stop_details: Any, text: str) -> str:
    explanation = stop_details.get("explanation") if isinstance(stop_details, dict) else None
    return str(explanation or text or "the model refused to answer")


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


@dataclass(slots=True)
class _Parts:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    thinking_blocks: list[dict[str, Any]] = field(default_factory=list)
    answered_by_tool: bool = False


def _collect(content: list[Any]) -> _Parts:
    parts = _Parts()
    for k, block in enumerate(content):
        if not isinstance(block, dict):
            raise _bad("a content block that is not an object", field=f"content[{k}]")
        kind = block.get("type")
        if kind == "text":
            parts.text.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            name = str(block.get("name") or "")
            if name.startswith(RESPONSE_TOOL_PREFIX):
                parts.text.append(_arguments(block.get("input")))
                parts.answered_by_tool = True
                continue
            parts.calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": name, "arguments": _arguments(block.get("input"))},
                }
            )
        elif kind == "thinking":
            parts.reasoning.append(str(block.get("thinking") or ""))
            parts.thinking_blocks.append(
                {"type": "thinking", "thinking": block.get("thinking"), "signature": block.get("signature")}
            )
        elif kind == "redacted_thinking":
            parts.thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data")})
        # Server-tool blocks (web search, code execution) are not requested by the gateway.
    return parts


def parse_completion(payload: dict[str, Any], *, model: str) -> dict[str, Any]:
    """A Messages API answer as an OpenAI ChatCompletion."""
    content = payload.get("content")
    if payload.get("type") != "message" or not isinstance(content, list):
        raise _bad("something that is not a message", type=str(payload.get("type"))[:100])
    parts = _collect(content)
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        raise _bad("a message without usage", field="usage")
    text = "".join(parts.text)
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if parts.calls:
        message["tool_calls"] = parts.calls
    if parts.reasoning:
        message["reasoning_content"] = "".join(parts.reasoning)
    if parts.thinking_blocks:
        message["thinking_blocks"] = parts.thinking_blocks
    stop_reason = payload.get("stop_reason")
    if stop_reason == "refusal":
        message["refusal"] = _refusal(payload.get("stop_details"), text)
    finish = _finish_reason(stop_reason, answered_by_tool=parts.answered_by_tool and not parts.calls)
    return {
        "id": payload.get("id") or "",
        "object": "chat.completion",
        "created": int(time.time()),  # Anthropic answers carry no timestamp
        "model": payload.get("model") or model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": normalize_usage(usage),
    }


# -- stream ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    kind: str  # "text", "tool", "response", "thinking", "redacted_thinking", "other"
    tool_index: int = -1
    sent_arguments: bool = False
    thinking: list[str] = field(default_factory=list)
    signature: list[str] = field(default_factory=list)  # joined at content_block_stop
    signature_chars: int = 0
    data: str = ""
    stopped: bool = False


class StreamDecoder:
    """SSE events of one Messages stream -> OpenAI `chat.completion.chunk` dicts.

    `scrub` cleans the upstream message of an `error` event before it reaches an error.
    """

    __slots__ = (
        "_scrub", "_model", "_id", "_created", "_start_usage", "_usage", "_stop_reason",
        "_stop_details", "_blocks", "_tools", "_answered_by_tool", "_text", "_done",
    )  # fmt: skip

    def __init__(self, *, scrub: Callable[[str], str], model: str = "") -> None:
        self._scrub = scrub
        self._model = model
        self._id = ""
        self._created = int(time.time())
        self._start_usage: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._stop_reason: Any = None
        self._stop_details: Any = None
        self._blocks: dict[int, _Block] = {}
        self._tools = 0  # tool_use blocks so far: the OpenAI index of the next tool call
        self._answered_by_tool = False
        self._text: list[str] = []  # kept only for a refusal without an explanation
        self._done = False

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]:
        if event == "ping":
            return []
        payload = self._load(data)
        kind = event or payload.get("type")
        if kind == "error":
            raise _event_error(payload, self._scrub)
        handler = _HANDLERS.get(str(kind))
        # New event types may appear (Anthropic's versioning policy): they are skipped.
        return handler(self, payload) if handler is not None else []

    def finish(self) -> list[dict[str, Any] | None]:
        if self._done:
            return []
        raise UpstreamUnavailable(
            "anthropic ended the stream before message_stop",
            metadata={"provider": NAME, "error_type": "stream_truncated"},
        )

    @staticmethod
    def _load(data: bytes) -> dict[str, Any]:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _bad("an SSE event that is not JSON") from exc
        if not isinstance(payload, dict):
            raise _bad("an SSE event that is not an object")
        return payload

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def _message_start(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        message = payload.get("message")
        if not isinstance(message, dict):
            raise _bad("message_start without a message")
        self._id = str(message.get("id") or "")
        self._model = str(message.get("model") or self._model)
        usage = message.get("usage")
        self._start_usage = usage if isinstance(usage, dict) else {}
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        block = payload.get("content_block")
        index = payload.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            raise _bad("content_block_start without a block and its index")
        kind = block.get("type")
        if kind == "tool_use":
            return self._tool_start(index, block)
        if kind == "text":
            self._blocks[index] = _Block("text")
            return self._text_delta(str(block.get("text") or ""))
        if kind == "thinking":
            self._blocks[index] = _Block("thinking")
            return self._thinking_delta(self._blocks[index], str(block.get("thinking") or ""))
        if kind == "redacted_thinking":
            self._blocks[index] = _Block("redacted_thinking", data=str(block.get("data") or ""))
        else:
            self._blocks[index] = _Block("other")
        return []

    def _tool_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any] | None]:
        name = str(block.get("name") or "")
        if name.startswith(RESPONSE_TOOL_PREFIX):
            self._blocks[index] = _Block("response")
            self._answered_by_tool = True
            return []
        tool_index, self._tools = self._tools, self._tools + 1
        self._blocks[index] = _Block("tool", tool_index=tool_index)
        call = {
            "index": tool_index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block(self, payload: dict[str, Any]) -> _Block:
        index = payload.get("index")
        block = self._blocks.get(index) if isinstance(index, int) else None
        if block is None:
            raise _bad("an event for a content block that was never started", index=index)
        return block

    def _block_delta(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        block = self._block(payload)
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            raise _bad("content_block_delta without a delta")
        kind = delta.get("type")
        if kind == "text_delta":
            return self._text_delta(str(delta.get("text") or ""))
        if kind == "input_json_delta":
            return self._arguments_delta(block, str(delta.get("partial_json") or ""))
        if kind == "thinking_delta":
            return self._thinking_delta(block, str(delta.get("thinking") or ""))
        if kind == "signature_delta":
            self._signature_delta(block, str(delta.get("signature") or ""))
        return []  # citations and delta types added later carry nothing the answer needs

    @staticmethod
    def _signature_delta(block: _Block, piece: str) -> None:
        """Keep a signature piece. Nothing is emitted before content_block_stop, so the answer cap
        cannot see the signature yet: it is bounded here, by what one SSE event may carry, and
        kept as pieces (joining with `+=` copied the whole signature for every event)."""
        block.signature_chars += len(piece)
        if block.signature_chars > MAX_EVENT_BYTES:
            raise _bad("a thinking signature over the event size limit", limit_bytes=MAX_EVENT_BYTES)
        block.signature.append(piece)

    def _text_delta(self, text: str) -> list[dict[str, Any] | None]:
        if not text:
            return []
        self._text.append(text)
        return [self._chunk({"content": text})]

    def _thinking_delta(self, block: _Block, text: str) -> list[dict[str, Any] | None]:
        if not text:
            return []
        block.thinking.append(text)
        return [self._chunk({"reasoning_content": text})]

    def _arguments_delta(self, block: _Block, fragment: str) -> list[dict[str, Any] | None]:
        if not fragment:
            return []
        block.sent_arguments = True
        if block.kind == "response":
            return [self._chunk({"content": fragment})]
        call = {"index": block.tool_index, "function": {"arguments": fragment}}
        return [self._chunk({"tool_calls": [call]})]

    def _block_stop(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        block = self._block(payload)
        block.stopped = True
        if block.kind == "thinking":
            opaque = {
                "type": "thinking",
                "thinking": "".join(block.thinking),
                "signature": "".join(block.signature),
            }
            return [self._chunk({"thinking_blocks": [opaque]})]
        if block.kind == "redacted_thinking":
            return [self._chunk({"thinking_blocks": [{"type": "redacted_thinking", "data": block.data}]})]
        if block.kind in ("tool", "response") and not block.sent_arguments:
            return self._arguments_delta(block, "{}")  # a call without input still has valid JSON
        return []

    def _message_delta(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        delta = payload.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason"):
            self._stop_reason = delta["stop_reason"]
            self._stop_details = delta.get("stop_details")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            # Cumulative counts: the latest replaces, never adds; a null keeps message_start's.
            self._usage.update({k: v for k, v in usage.items() if v is not None})
        return []

    def _message_stop(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        if self._stop_reason is None:
            raise _bad("message_stop before any stop reason")
        # A block never stopped was cut (a tool call with half its arguments): not an answer.
        unfinished = [index for index, block in self._blocks.items() if not block.stopped]
        if unfinished:
            raise _bad("message_stop with a content block still open", index=unfinished[0])
        self._done = True
        finish = _finish_reason(
            self._stop_reason, answered_by_tool=self._answered_by_tool and not self._tools
        )
        delta: dict[str, Any] = {}
        if self._stop_reason == "refusal":
            delta["refusal"] = _refusal(self._stop_details, "".join(self._text))
        chunk = self._chunk(delta, finish)
        chunk["usage"] = normalize_usage({**self._start_usage, **self._usage})
        return [chunk, None]


_Handler = Callable[[StreamDecoder, dict[str, Any]], list[dict[str, Any] | None]]
_HANDLERS: dict[str, _Handler] = {
    "message_start": StreamDecoder._message_start,
    "content_block_start": StreamDecoder._block_start,
    "content_block_delta": StreamDecoder._block_delta,
    "content_block_stop": StreamDecoder._block_stop,
    "message_delta": StreamDecoder._message_delta,
    "message_stop": StreamDecoder._message_stop,
}


# -- errors ----------------------------------------------------------------------------------


def _error_fields(body: bytes) -> tuple[str, str]:
    """The `error.type` and `request_id` of an Anthropic error body ("" when absent)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(payload, dict):
        return "", ""
    error = payload.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    return str(kind or "")[:100], str(payload.get("request_id") or "")[:100]


def error_for_status(
    status: int, body: bytes, headers: Mapping[str, str], *, scrub: Callable[[str], str]
) -> RetryableError | GatewayError:
    """The error for a non-2xx Messages answer; RetryableError where a retry may help."""
    error_type, request_id = _error_fields(body)
    meta: dict[str, object] = {"provider": NAME, "http_status": status, "error_type": error_type}
    request_id = request_id or str(headers.get("request-id") or "")[:100]
    if request_id:
        meta["request_id"] = request_id
    return _classify(status, body, headers, meta, scrub, f"anthropic answered HTTP {status}")


def _event_error(payload: dict[str, Any], scrub: Callable[[str], str]) -> GatewayError:
    """An `error` SSE event after a 200, as the status its type stands for would map."""
    raw = orjson.dumps(payload, default=str)
    error_type, request_id = _error_fields(raw)
    status = _TYPE_STATUS.get(error_type, 500)
    meta: dict[str, object] = {"provider": NAME, "http_status": 200, "error_type": error_type}
    if request_id:
        meta["request_id"] = request_id
    mapped = _classify(status, raw, {}, meta, scrub, "anthropic sent an error event in the stream")
    return mapped.error if isinstance(mapped, RetryableError) else mapped


def _classify(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    meta: dict[str, object],
    scrub: Callable[[str], str],
    text: str,
) -> RetryableError | GatewayError:
    message = upstream_message(body, scrub)
    error_type = meta["error_type"]
    if error_type:
        text += f" ({error_type})"
    if message:
        text += f": {message}"
    if status == 429:
        retry_after = parse_retry_after(headers)
        delay = retry_after if retry_after is not None else 1.0
        return RetryableError(
            RateLimitExceeded(text, metadata=meta, retry_delay=delay), status=429, retry_after=retry_after
        )
    if status in (401, 403):
        return UpstreamAuthFailed(text, metadata=meta)
    if status == 404:
        return not_found_error(body, text, meta, provider=NAME)
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(headers)
        retry_status = _OVERLOADED_RETRY_STATUS if status == _OVERLOADED else status
        error = UpstreamUnavailable(text, metadata=meta, retry_delay=retry_after)
        return RetryableError(error, status=retry_status, retry_after=retry_after)
    too_long = _TOO_LONG.search(message) if status in (400, 413) else None
    if too_long is not None:
        return _context_window(too_long, text, meta)
    over = _OVER_LIMIT.search(message) if status == 400 else None
    if over is not None:
        counts = {"prompt_tokens": int(over[1]), "max_tokens": int(over[2]), "context_window": int(over[3])}
        return ContextWindowExceeded(text, metadata={**meta, **counts})
    if 400 <= status < 500:
        return UpstreamRejected(text, metadata=meta)
    return UpstreamBadResponse(text, metadata=meta)


def _context_window(match: re.Match[str], text: str, meta: dict[str, object]) -> ContextWindowExceeded:
    counts: dict[str, object] = {}
    prompt, window = match.group(1), match.group(2)
    if prompt:
        counts = {"prompt_tokens": int(prompt), "context_window": int(window)}
    return ContextWindowExceeded(text, metadata={**meta, **counts})
