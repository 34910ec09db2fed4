"""Assemble a streamed chat completion from its chunks (OpenAI `chat.completion.chunk` JSON).

Content and reasoning_content are concatenated, tool-call fragments merged by `index` (id and
name set once, arguments appended), finish_reason and model taken from the latest chunk, usage
from the usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.core.completion import text_of


@dataclass(slots=True)
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _ChoiceParts:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCallParts] = field(default_factory=dict)
    finish_reason: str | None = None
    role: str = "assistant"


def _index_for(parts: _ChoiceParts, call_id: object) -> int:
    if not parts.tool_calls:
        return 0
    last = max(parts.tool_calls)
    current = parts.tool_calls[last].id
    return last + 1 if call_id and current and call_id != current else last


class StreamAccumulator:
    """Feed every chunk with `add`; `completion()` returns the assembled ChatCompletion JSON."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.system_fingerprint: str | None = None
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, _ChoiceParts] = {}
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        get = chunk.get
        value = get("id")
        if value:
            self.id = value
        value = get("model")
        if value:
            self.model = value
        value = get("created")
        if value:
            self.created = int(value)
        value = get("system_fingerprint")
        if value:
            self.system_fingerprint = value
        value = get("usage")
        if value:
            self.usage = value
        for choice in get("choices") or ():
            index = int(choice.get("index") or 0)
            parts = self.choices.get(index)
            if parts is None:
                parts = self.choices[index] = _ChoiceParts()
            delta = choice.get("delta")
            if delta:
                text = text_of(delta.get("content"))
                if text:
                    parts.content.append(text)
                reasoning = text_of(delta.get("reasoning_content") or delta.get("reasoning"))
                if reasoning:
                    parts.reasoning.append(reasoning)
                fragments = delta.get("tool_calls")
                if fragments:
                    self._add_fragments(parts, fragments)
                legacy = delta.get("function_call")
                if legacy:
                    call = parts.tool_calls.setdefault(0, _ToolCallParts())
                    if legacy.get("name"):
                        call.name = legacy["name"]
                    if legacy.get("arguments"):
                        call.arguments.append(legacy["arguments"])
            reason = choice.get("finish_reason")
            if reason:
                parts.finish_reason = reason

    @staticmethod
    def _add_fragments(parts: _ChoiceParts, fragments: list[dict[str, Any]]) -> None:
        for fragment in fragments:
            raw_index = fragment.get("index")
            if raw_index is None:
                # Some servers (Gemini's OpenAI endpoint, proxies) omit `index`: a fragment with a
                # new id starts a new call. The index is written back into the chunk so the
                # deltas relayed for it agree with the assembled answer.
                call_index = _index_for(parts, fragment.get("id"))
                fragment["index"] = call_index
            else:
                call_index = int(raw_index)
            call = parts.tool_calls.get(call_index)
            if call is None:
                call = parts.tool_calls[call_index] = _ToolCallParts()
            if fragment.get("id"):
                call.id = fragment["id"]
            function = fragment.get("function") or {}
            if function.get("name"):
                call.name = function["name"]
            if function.get("arguments"):
                call.arguments.append(function["arguments"])

    @property
    def finished(self) -> bool:
        """Every choice seen has a finish reason (an answer that looks complete is complete)."""
        return bool(self.choices) and all(c.finish_reason for c in self.choices.values())

    def completion(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index in sorted(self.choices):
            parts = self.choices[index]
            message: dict[str, Any] = {"role": parts.role, "content": "".join(parts.content) or None}
            if parts.reasoning:
                message["reasoning_content"] = "".join(parts.reasoning)
            if parts.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": "".join(call.arguments)},
                    }
                    for _, call in sorted(parts.tool_calls.items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": parts.finish_reason})
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.system_fingerprint:
            body["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            body["usage"] = self.usage
        return body
