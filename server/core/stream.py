"""Assemble a streamed chat completion from its chunks (OpenAI `chat.completion.chunk` JSON).

Content, reasoning_content and refusal are concatenated, tool-call fragments merged by `index`
(id, name and arguments appended, as clients join them; an id or name repeated whole is not
doubled; Gemini's thought_signature set once), thinking_blocks (the opaque parts a provider needs
back next turn) appended in order, finish_reason and model taken from the latest chunk, usage
from the usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import orjson

from server.core.completion import (
    MAX_CHOICES,
    MAX_TOOL_CALLS,
    answer_too_large,
    plain_choice,
    text_bytes,
    text_of,
    too_many,
)

_BLOCK = 32  # pieces (or blocks of one level) joined into one str at a time


class TextParts:
    """Text that arrives in many small pieces, kept compactly.

    One str per piece costs ~50 bytes of object header besides its text: a 50 MB answer in
    tokens took RSS from 235 to 2,658 MiB. Every `_BLOCK` pieces are joined into one str, and
    every `_BLOCK` strs of one level into one of the next (a base-`_BLOCK` counter): at most
    `_BLOCK - 1` strs wait per level, so a stream of 200 tokens keeps ~40 strs, not 200 (with
    256-piece blocks each of 500 held streams kept ~15 KiB of str headers), and each piece is
    copied once per level (log_32: 5 times for 30M pieces), linear enough.
    """

    __slots__ = ("_levels", "loose")

    def __init__(self) -> None:
        # _levels[i]: strs of _BLOCK ** (i + 1) pieces each; a higher level holds earlier text.
        self._levels: list[list[str]] = []
        self.loose: list[str] = []  # the pieces not joined yet (fewer than _BLOCK between appends)

    def append(self, piece: str) -> None:
        loose = self.loose
        loose.append(piece)
        if len(loose) >= _BLOCK:
            self.fold()

    def fold(self) -> None:
        """Join the loose pieces into one block, and a full level into one of the next."""
        joined = "".join(self.loose)
        self.loose.clear()
        for level in self._levels:
            level.append(joined)
            if len(level) < _BLOCK:
                return
            joined = "".join(level)
            level.clear()
        self._levels.append([joined])

    def __bool__(self) -> bool:
        # The top level is never emptied once made: any fold leaves a str there.
        return bool(self.loose or self._levels)

    def text(self) -> str:
        if not self._levels:
            return "".join(self.loose)
        return "".join([*chain.from_iterable(reversed(self._levels)), *self.loose])

    def strs(self) -> int:
        """How many strs hold the text (what the compaction bounds)."""
        return len(self.loose) + sum(len(level) for level in self._levels)


@dataclass(slots=True)
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: TextParts = field(default_factory=TextParts)
    thought_signature: str = ""


@dataclass(slots=True)
class _ChoiceParts:
    content: TextParts = field(default_factory=TextParts)
    reasoning: TextParts = field(default_factory=TextParts)
    refusal: TextParts = field(default_factory=TextParts)
    thinking_blocks: list[dict[str, Any]] = field(default_factory=list)
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

    def __init__(self, *, provider: str = "upstream", max_answer_bytes: int = sys.maxsize) -> None:
        self.provider = provider
        self.max_answer_bytes = max_answer_bytes
        self.size = 0  # UTF-8 bytes of content, reasoning and tool calls so far (what the cap counts)
        self.id = ""
        self.model = ""
        self.created = 0
        self.system_fingerprint: str | None = None
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, _ChoiceParts] = {}
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
        """Take in a chunk; the chunk's `plain_choice` (its one choice and text content, when
        that is all its delta relays), found on the way: the stream relays such a chunk as is."""
        self.chunks += 1
        get = chunk.get
        value = get("id")
        if value:
            self.id = value
        value = get("model")
        if value:
            self.model = value
        value = get("created")
        if value and value != self.created:  # (the same in every chunk: no int() each time)
            self.created = int(value)
        value = get("system_fingerprint")
        if value:
            self.system_fingerprint = value
        value = get("usage")
        if value:
            self.usage = value
        choices = get("choices")
        plain = None
        single = type(choices) is list and len(choices) == 1  # as plain_choice asks
        for choice in choices or ():
            index = choice.get("index") or 0
            if type(index) is not int:
                index = int(index)
            parts = self.choices.get(index)
            if parts is None:
                if len(self.choices) >= MAX_CHOICES:
                    raise too_many(self.provider, "choices", len(self.choices) + 1, MAX_CHOICES)
                parts = self.choices[index] = _ChoiceParts()
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                text = content if type(content) is str else text_of(content)
                if text:
                    # _grow inlined: this runs for every token of every stream.
                    size = self.size + (len(text) if text.isascii() else text_bytes(text))
                    if size > self.max_answer_bytes:
                        raise answer_too_large(self.provider, self.max_answer_bytes, size)
                    self.size = size
                    # TextParts.append inlined, as above.
                    loose = parts.content.loose
                    loose.append(text)
                    if len(loose) >= _BLOCK:
                        parts.content.fold()
                if len(delta) > 1 or content is None:  # else content was its only field
                    self._add_rest(parts, delta)
                    if text and single:
                        plain = plain_choice(chunk)
                elif text and single and type(content) is str and type(delta) is dict:
                    plain = choice, content
            reason = choice.get("finish_reason")
            if reason:
                parts.finish_reason = reason
        return plain

    def _add_rest(self, parts: _ChoiceParts, delta: dict[str, Any]) -> None:
        """What a delta carries besides its content."""
        reasoning = text_of(delta.get("reasoning_content") or delta.get("reasoning"))
        if reasoning:
            self._grow(reasoning)
            parts.reasoning.append(reasoning)
        fragments = delta.get("tool_calls")
        if fragments:
            self._add_fragments(parts, fragments)
        refusal = text_of(delta.get("refusal"))
        if refusal:
            self._grow(refusal)
            parts.refusal.append(refusal)
        blocks = delta.get("thinking_blocks")
        if blocks:
            self._add_blocks(parts, blocks)
        legacy = delta.get("function_call")
        if legacy:
            call = parts.tool_calls.get(0)
            if call is None:
                call = parts.tool_calls[0] = _ToolCallParts()
            if legacy.get("name"):
                self._grow(legacy["name"])
                call.name = legacy["name"]
            if legacy.get("arguments"):
                self._grow(legacy["arguments"])
                call.arguments.append(legacy["arguments"])

    def _grow(self, text: str) -> None:
        """Count a piece against the answer cap before it is kept."""
        size = self.size + text_bytes(text)
        if size > self.max_answer_bytes:
            raise answer_too_large(self.provider, self.max_answer_bytes, size)
        self.size = size

    def _add_fragments(self, parts: _ChoiceParts, fragments: list[dict[str, Any]]) -> None:
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
                if call_index >= MAX_TOOL_CALLS or len(parts.tool_calls) >= MAX_TOOL_CALLS:
                    raise too_many(self.provider, "tool_calls", call_index + 1, MAX_TOOL_CALLS)
                call = parts.tool_calls[call_index] = _ToolCallParts()
            # An id or a name split over fragments is joined, as a client joins the deltas (the
            # latest piece alone could be the end of an echoed key, which nothing would match);
            # servers that repeat the whole value in every fragment are not doubled.
            call_id = fragment.get("id")
            if call_id and call_id != call.id:
                self._grow(call_id)
                call.id += call_id
            function = fragment.get("function") or {}
            name = function.get("name")
            if name and name != call.name:
                self._grow(name)
                call.name += name
            if function.get("arguments"):
                self._grow(function["arguments"])
                call.arguments.append(function["arguments"])
            signature = fragment.get("thought_signature")
            # Only Gemini's translator sets one: another upstream's value of another type is
            # dropped, as the unary answer drops it (`completion._signature`).
            if signature and isinstance(signature, str):
                self._grow(signature)
                call.thought_signature = signature

    def _add_blocks(self, parts: _ChoiceParts, blocks: list[dict[str, Any]]) -> None:
        for block in blocks:
            # Opaque, but counted: a signature or redacted thinking can be large.
            self._grow(orjson.dumps(block).decode())
            parts.thinking_blocks.append(block)

    @property
    def finished(self) -> bool:
        """Every choice seen has a finish reason (an answer that looks complete is complete)."""
        return bool(self.choices) and all(c.finish_reason for c in self.choices.values())

    def completion(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index in sorted(self.choices):
            parts = self.choices[index]
            message: dict[str, Any] = {"role": parts.role, "content": parts.content.text() or None}
            if parts.reasoning:
                message["reasoning_content"] = parts.reasoning.text()
            if parts.refusal:
                message["refusal"] = parts.refusal.text()
            if parts.thinking_blocks:
                message["thinking_blocks"] = parts.thinking_blocks
            if parts.tool_calls:
                message["tool_calls"] = [_tool_call(call) for _, call in sorted(parts.tool_calls.items())]
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


def _tool_call(call: _ToolCallParts) -> dict[str, Any]:
    assembled: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.text()},
    }
    if call.thought_signature:
        assembled["thought_signature"] = call.thought_signature
    return assembled
