"""An answer's tool calls against what the request asked for, on every provider's path.

- The caller required a call (`function_call: "required"`) or forced one (`force_tool_call`,
  or `function_call` naming a function) and the answer has no call (or, forced, none of that
  function): TOOL_CALL_MISSING (UNAVAILABLE, as UNPARSEABLE_MODEL_OUTPUT: the model's output
  is not what was promised, and sampling again may give it). Never OK: an agent promised a
  call would take the text for a final answer. The model's text stays in the trace
  (response_json is set before the check). An answer cut at the token limit
  (`finish_reason: "length"`) is not checked: it is OK/LENGTH, the call may be what was cut.
- The gateway's own default "required" (functions and no `function_call`) counts as required.
  Where configured (LLMGW_TOOL_CALL_MISSING_RETRY), or when the answer just showed the upstream
  to be llama-server, which ignored a named `tool_choice`, the call is asked once more before
  TOOL_CALL_MISSING (`ask_again`).
- At most one call was asked for (`parallel_tool_calls: false`, or a local wrapper) of a server
  known to ignore it (llama.cpp's, recognized as in `tools.takes_named_tool_choice`) and the
  answer has several: the first is kept; the others are listed in the trace's stored response
  JSON under DROPPED_KEY, so what the model said is not lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from llmgateway.v1 import chat_pb2

from server.config import Settings
from server.core import tools, upstream_kind
from server.core.completion import MAX_TOKEN_COUNT
from server.errors import ToolCallMissing
from server.traces.base import TraceRecord

_NAMED_CHOICES = frozenset({"", "none", "auto", "required"})
_TEXT_CHARS = 200  # of the model's text in the error message (all of it is in the trace)
# The key of the stored response JSON that lists the calls the gateway dropped.
DROPPED_KEY = "llmgateway_dropped_tool_calls"


@dataclass(frozen=True, slots=True)
class Expected:
    """What the request asked of the answer's calls."""

    required: bool = False  # at least one call
    forced: str = ""  # a call of this function
    at_most_one: bool = False  # parallel_tool_calls: false


NOTHING = Expected()


def expected(
    request: chat_pb2.CreateRequest,
    body: dict[str, Any] | None = None,
    *,
    endpoint: str = "",
    answer: dict[str, Any] | None = None,
) -> Expected:
    """What `request` (and the OpenAI-shaped `body` built for it, if any, sent to the base URL
    `endpoint`) asks of the answer.

    With the OpenAI-shaped `answer` (a unary call's, before `check`): `at_most_one` is worked
    out only when a choice of it has several calls, the only case where it changes what `check`
    does (it cuts them); otherwise it is False. A stream's deltas need it before any answer.
    """
    if not request.functions:
        return NOTHING
    forced = request.force_tool_call or (
        request.function_call if request.function_call not in _NAMED_CHOICES else ""
    )
    if body is None:  # the local path: the wrappers always ask for one call
        return Expected(required=True, forced=forced, at_most_one=True)
    choice = body.get("tool_choice")
    legacy = body.get("function_call")
    if isinstance(legacy, dict):  # legacy spelling of a forced call (or "required", one function)
        forced = forced or str(legacy.get("name") or "")
    # Checked whenever a call was asked of the upstream: a forced function, or "required",
    # the caller's or the gateway's own default for an empty `function_call` (seed: functions
    # and no function_call -> "required"; an agent built on it fails on a text answer anyway).
    # Not where "auto" was sent instead (vLLM, nebius and MLX, the seed's exception; legacy
    # `functions` with several of them): no call was required of the model there.
    required = bool(forced) or choice == "required"
    # Servers that honour `parallel_tool_calls: false` answer one call; one known to ignore it
    # (llama.cpp's, up to 5 calls seen) has the extra ones cut here. Others keep what they sent.
    # The server's kind (a pure look-up, the costlier part) is asked only when it can matter:
    # the flag was sent and, with a unary `answer`, a choice has several calls to cut.
    at_most_one = False
    if body.get("parallel_tool_calls") is False and (answer is None or _several_calls(answer)):
        config = request.llm_config
        at_most_one = not tools.takes_named_tool_choice(
            handle=config.handle, model=config.model, endpoint=endpoint
        )
    if not required and not at_most_one:
        # Nothing to check (forced is empty too: it implies required). NOTHING is this value,
        # and `check` then returns at once instead of walking the choices to no effect.
        return NOTHING
    return Expected(required=required, forced=forced, at_most_one=at_most_one)


def _several_calls(answer: dict[str, Any]) -> bool:
    """Whether a choice of the answer has more than one call (the choices `check` would cut)."""
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list) and len(calls) > 1:
            return True
    return False


def check(answer: dict[str, Any], want: Expected, *, provider: str) -> list[dict[str, Any]]:
    """Raise ToolCallMissing when a required call is absent; keep only the first call when at
    most one was asked for. Works on the OpenAI-shaped answer in place; returns the dropped calls."""
    if want is NOTHING:
        return []
    dropped: list[dict[str, Any]] = []
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            continue
        message = choice["message"]
        calls = message.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        if want.at_most_one and len(calls) > 1:
            dropped.extend(calls[1:])
            message["tool_calls"] = calls = calls[:1]
        if not want.required or choice.get("finish_reason") == "length":
            continue
        names = [_name(call) for call in calls]
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            names.append(str(legacy.get("name") or ""))
        if names and (not want.forced or want.forced in names):
            continue
        raise _missing(message, names, want, provider, choice.get("finish_reason"))
    return dropped


def ask_again(body: dict[str, Any], endpoint: str, *, settings: Settings) -> bool:
    """After TOOL_CALL_MISSING: whether the call is sent once more (it is then planned again).

    - LLMGW_TOOL_CALL_MISSING_RETRY is on: a new sample may call (once; off by default, as a
      second call costs as much as the first);
    - a forced call went with a named `tool_choice` to a base URL its answer just showed to be
      llama-server's (`server.core.upstream_kind`), which ignores that form: the next attempt
      goes in the form it honours (the forced function alone, "required"), whatever the setting.
    """
    if settings.tool_call_missing_retry:
        return True
    return isinstance(body.get("tool_choice"), dict) and upstream_kind.is_llamacpp(endpoint)


def carries_text(event: chat_pb2.StreamCreateResponse) -> bool:
    """A streamed delta the caller cannot take back (text, reasoning or a call), as opposed to
    a role or finish marker: after one, a missing call is not asked again."""
    delta = event.delta
    return event.HasField("delta") and bool(delta.content or delta.reasoning_content or delta.tool_calls)


def first_call_only(
    events: list[chat_pb2.StreamCreateResponse], want: Expected
) -> list[chat_pb2.StreamCreateResponse]:
    """Streamed deltas without the fragments of calls after the first (index > 0) when at most
    one call was asked for: the deltas then add up to the final completion, which keeps one."""
    if not want.at_most_one:
        return events
    kept: list[chat_pb2.StreamCreateResponse] = []
    for event in events:
        delta = event.delta
        if event.HasField("delta") and any(call.index > 0 for call in delta.tool_calls):
            calls = [call for call in delta.tool_calls if call.index == 0]
            del delta.tool_calls[:]
            delta.tool_calls.extend(calls)
            if not (delta.content or delta.reasoning_content or delta.tool_calls or delta.finish_reason):
                continue
        kept.append(event)
    return kept


def enforce(answer: dict[str, Any], want: Expected, record: TraceRecord, *, provider: str) -> None:
    """`check`, and the dropped calls listed in the trace's stored response JSON. A failed
    check keeps the upstream's token counts on the trace: they were spent (and billed)."""
    try:
        dropped = check(answer, want, provider=provider)
    except ToolCallMissing:
        keep_usage(record, answer.get("usage"))
        raise
    if dropped:
        record.response_json = trimmed_json(record.response_json, dropped)


def keep_usage(record: TraceRecord, usage: Any) -> None:
    """The answer's token counts onto the trace of a call that fails after the upstream answered
    (they were spent and billed); also `server.core.reasoning_only`'s."""
    if record.total_tokens or not isinstance(usage, dict):
        return  # already kept (the local path), or none reported
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return  # (the answer's usage was shape-checked: integers, bounded)
    if prompt + completion > MAX_TOKEN_COUNT:
        # Each in range, their sum not (a broken upstream's): a trace total no Usage can hold
        # would fail every read of the trace. Kept as none reported.
        return
    record.prompt_tokens, record.completion_tokens = prompt, completion
    record.total_tokens = record.prompt_tokens + record.completion_tokens


def trimmed_json(stored: str, dropped: list[dict[str, Any]]) -> str:
    """The trace's response JSON with the dropped calls listed under DROPPED_KEY."""
    if not dropped:
        return stored
    try:
        payload = orjson.loads(stored)
    except orjson.JSONDecodeError:
        payload = {"raw": stored}
    if not isinstance(payload, dict):
        payload = {"raw": payload}
    payload[DROPPED_KEY] = dropped
    return orjson.dumps(payload).decode()


def _name(call: Any) -> str:
    if not isinstance(call, dict):
        return ""
    function = call.get("function")
    return str(function.get("name") or "") if isinstance(function, dict) else ""


def _missing(
    message: dict[str, Any], names: list[str], want: Expected, provider: str, finish: Any
) -> ToolCallMissing:
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    asked = f"a call of {want.forced!r}" if want.forced else "a tool call"
    got = f"calls of {', '.join(repr(n) for n in names)}" if names else "no tool call"
    shown = " ".join(text[:_TEXT_CHARS].split())
    return ToolCallMissing(
        f"{provider} was asked for {asked} and answered with {got}"
        + (f"; the model wrote: {shown!r}" if shown else ""),
        metadata={
            "provider": provider,
            "tool_choice": want.forced or "required",
            "called": ",".join(names),
            "finish_reason": str(finish or ""),
            "content_chars": len(text),
        },
    )
