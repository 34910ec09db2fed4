"""Completion text from a local model -> one function call.

What is tolerated (each case has an example in tests/fixtures/local_outputs.json):

- text around the JSON: chatty preambles, explanations after it, ```json fences, a
  `<think>...</think>` block (DeepSeek-R1; used as inner thoughts when params carry none),
  chat-template tokens the server did not strip (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...);
- JSON breakage, via `lenient_json`: trailing commas, missing closing braces/brackets/quotes,
  raw newlines and tabs inside strings, single quotes, Python True/False/None, `\\_`;
- the prompt's primed prefix (`{"function": "send_message",`), put back when the completion
  continues it, ignored when the model wrote the whole object anyway;
- shapes: `{"function": NAME, "params": {...}}` with `arguments` / `parameters` / `args` for
  `params`, params given as a JSON string, params flattened into the top level, a nested function
  object (`{"function": {"name": ..., "arguments": ...}}`), OpenAI's `{"name", "arguments"}`,
  `{"function_call": {...}}`, and one wrapping object around any of these;
- several JSON objects (a duplicated answer): the first one that is a function call wins.

A completion the server cut at the token limit (`truncated=True`) is read without the repairs
that close what was left open at the end of the text: closing a cut call would make up a
complete-looking call whose last value was cut mid-word. Only a call that was complete before
the cut counts; otherwise the caller returns the text as written (FINISH_REASON_LENGTH).

Inner thoughts (`thinking`, or the older `inner_thoughts`) are popped from the params; an
inner-thoughts key beside `function` is taken too. Anything else is `UnparseableModelOutput`,
with the raw text (cut to 500 characters) in its metadata under `raw_output`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.core.inner_thoughts import INNER_THOUGHTS_KWARG, LEGACY_INNER_THOUGHTS_KWARG
from server.errors import UnparseableModelOutput
from server.providers.local import lenient_json

RAW_OUTPUT_LIMIT = 500
_MAX_CANDIDATES = 64
# Candidates nest: each one re-reads the text after it, so 64 of them over one long broken
# stretch cost 64 times its length (100,000 characters: ~6 s of pure Python). Reading stops once
# the candidates together have read this many times the text (plus a small allowance): a call
# after a long broken draft is still found, nested re-reads of the same stretch are not made.
_SCAN_FACTOR = 1
_SCAN_ALLOWANCE = 65_536
_SPECIAL_TOKENS = re.compile(
    r"<\|(?:im_end|im_start|eot_id|end_of_text|endoftext|end|start_header_id|end_header_id)\|>|</s>|<s>"
)
_THINK_BLOCK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_ARGUMENT_KEYS = ("params", "arguments", "parameters", "args", "kwargs")
_THOUGHT_KEYS = (INNER_THOUGHTS_KWARG, LEGACY_INNER_THOUGHTS_KWARG)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One function call read from a completion; `inner_thoughts` popped from its params."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    inner_thoughts: str | None = None


class _NotACall(Exception):
    """A JSON value that is not (or not quite) a function call; the message says why."""


def parse_function_call(
    text: str, *, primed_prefix: str = "", pop_inner_thoughts: bool = True, truncated: bool = False
) -> ParsedCall:
    """Read the one function call in `text` (a completion that may continue `primed_prefix`).

    `truncated`: the server stopped at the token limit (see the module docstring).
    """
    cleaned, think = _clean(text)
    variants = [cleaned]
    unfenced = _FENCE.sub("", cleaned)
    if unfenced != cleaned:
        # Fences are removed only as a fallback: a message may itself hold a fenced code block.
        variants.append(unfenced)
    attempts: list[str] = []
    for variant in variants:
        if not primed_prefix:
            attempts.append(variant)
            continue
        continued = primed_prefix + variant
        # A completion that opens its own object ignored the priming; otherwise it continues it.
        opens_object = variant.lstrip().startswith("{")
        attempts += [variant, continued] if opens_object else [continued, variant]

    reasons: list[str] = []
    for attempt in attempts:
        try:
            call = _first_call(attempt, truncated=truncated)
        except _NotACall as exc:
            reasons.append(str(exc))
            continue
        return _finish(call, think, pop_inner_thoughts=pop_inner_thoughts)
    reason = reasons[0]  # the likelier reading of the text failed first
    raise UnparseableModelOutput(
        f"the local model's answer is not a function call ({reason}); expected "
        '{"function": NAME, "params": {...}}',
        metadata={"raw_output": text[:RAW_OUTPUT_LIMIT]},
    )


def _clean(text: str) -> tuple[str, str | None]:
    thoughts: list[str] = []
    close = text.rfind("</think>")
    if close != -1 and "<think>" not in text[:close]:
        # R1 chat templates open the think block in the prompt: the answer starts inside it.
        thoughts.append(text[:close].strip())
        text = text[close + len("</think>") :]
    thoughts += [m.group(1).strip() for m in _THINK_BLOCK.finditer(text)]
    text = _THINK_BLOCK.sub("", text)
    text = _SPECIAL_TOKENS.sub("", text)
    think = "\n".join(t for t in thoughts if t) or None
    return text, think


def _first_call(text: str, *, truncated: bool = False) -> tuple[str, dict[str, Any], Any]:
    reason: str | None = None
    pos = text.find("{")
    tried = 0
    text_end = len(text.rstrip())
    budget = _SCAN_FACTOR * len(text) + _SCAN_ALLOWANCE
    while pos != -1 and tried < _MAX_CANDIDATES:
        if budget <= 0:
            reason = reason or "gave up reading candidates"
            break
        tried += 1
        try:
            value, end, repaired = lenient_json.decode_at(text, pos)
        except lenient_json.LenientJSONError as exc:
            budget -= max(exc.offset, pos + 1) - pos
            reason = reason or f"invalid JSON: {exc}"
            pos = text.find("{", pos + 1)
            continue
        budget -= max(end, pos + 1) - pos
        if truncated and repaired and end >= text_end:
            # Read to the end of a cut text with repairs: what was open there was closed by us.
            reason = reason or "the output was cut off by the token limit before the call was complete"
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            try:
                return _interpret(value, depth=0)
            except _NotACall as exc:
                reason = reason or str(exc)
            pos = text.find("{", max(end, pos + 1))
        else:
            pos = text.find("{", pos + 1)
    raise _NotACall(reason or "no JSON object found")


def _interpret(obj: Mapping[str, Any], *, depth: int) -> tuple[str, dict[str, Any], Any]:
    """(name, arguments, thoughts found beside the call) from one decoded object."""
    outer_thoughts = next((obj[k] for k in _THOUGHT_KEYS if k in obj), None)
    function = obj.get("function")
    if isinstance(function, Mapping):
        # Models that ignore the priming nest the call: {"function": {"name": ..., "arguments": ...}}.
        name = function.get("name", function.get("function"))
        if _has_arguments(function):
            return _checked_name(name), _arguments(function), outer_thoughts
        if _has_arguments(obj):
            return _checked_name(name), _arguments(obj), outer_thoughts
        rest = {k: v for k, v in function.items() if k not in ("name", "function")}
        if rest:
            return _checked_name(name), rest, outer_thoughts
        raise _NotACall(f"function {name!r} has no params")
    if isinstance(function, str):
        name = _checked_name(function)
        if _has_arguments(obj):
            return name, _arguments(obj), outer_thoughts
        # Some models flatten the params into the top level.
        rest = {k: v for k, v in obj.items() if k not in ("function", *_THOUGHT_KEYS)}
        if rest:
            return name, rest, outer_thoughts
        raise _NotACall(f"the call to {function!r} has no params (the output may have been cut off)")
    if function is not None:
        raise _NotACall(f'"function" is {type(function).__name__}, not a function name')
    if isinstance(obj.get("function_call"), Mapping):
        name, arguments, thoughts = _interpret(obj["function_call"], depth=depth)
        return name, arguments, thoughts if thoughts is not None else outer_thoughts
    if isinstance(obj.get("name"), str) and _has_arguments(obj):
        return _checked_name(obj["name"]), _arguments(obj), outer_thoughts
    if depth == 0:
        # One wrapping object, e.g. {"response": {"function": ...}} or {"tool_calls": [{...}]}.
        for value in obj.values():
            inner = value[0] if isinstance(value, list) and value else value
            if isinstance(inner, Mapping):
                try:
                    return _interpret(inner, depth=1)
                except _NotACall:
                    continue
    raise _NotACall('a JSON object without a "function" key')


def _has_arguments(obj: Mapping[str, Any]) -> bool:
    return any(key in obj for key in _ARGUMENT_KEYS)


def _arguments(obj: Mapping[str, Any]) -> dict[str, Any]:
    key = next(k for k in _ARGUMENT_KEYS if k in obj)
    value = obj[key]
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = lenient_json.loads(value)
        except lenient_json.LenientJSONError as exc:
            raise _NotACall(f'"{key}" is a string that is not JSON: {exc}') from exc
    if not isinstance(value, dict):
        raise _NotACall(f'"{key}" is {type(value).__name__}, not an object')
    return value


def _checked_name(name: Any) -> str:
    if not isinstance(name, str):
        raise _NotACall("the function name is not a string")
    cleaned = name.strip().removesuffix("()").strip()
    if not _NAME.fullmatch(cleaned):
        raise _NotACall(f"{name[:60]!r} is not a function name")
    return cleaned


def _finish(
    call: tuple[str, dict[str, Any], Any], think: str | None, *, pop_inner_thoughts: bool
) -> ParsedCall:
    name, arguments, outer_thoughts = call
    arguments = dict(arguments)
    thoughts: list[Any] = []
    if pop_inner_thoughts:
        thoughts = [arguments.pop(k) for k in _THOUGHT_KEYS if k in arguments]
    candidates = [*thoughts, outer_thoughts, think]
    inner = next((_as_text(t) for t in candidates if t not in (None, "")), None)
    return ParsedCall(name=name, arguments=arguments, inner_thoughts=inner)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
