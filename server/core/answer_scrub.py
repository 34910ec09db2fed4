"""Keys the server holds never reach a caller in an answer, even when an upstream echoes them.

An upstream that echoes request headers (a debugging proxy, a tenant's own endpoint) would hand
the caller the key the gateway sent. `AnswerScrubber` replaces every known secret (the server's
keys, the BYOK keys in play, and the key sent on this call) in a completion, and in the deltas of
a stream across chunk boundaries: per text channel (a choice's reasoning, its content, the
arguments of each tool call) it holds back only the tail that could still be the start of a
secret (never more than the longest secret minus one character), releases it as soon as it
cannot be, and releases the rest at the choice's finish reason or at the end of the stream.

Only exact known values are replaced (`Redactor.redact_known`), not key-shaped patterns: a model
may legitimately write `api_key="sk-..."` in an answer.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmgateway.v1 import chat_pb2

from server.auth.redact import Redactor
from server.core.completion import StreamedText

_REASONING, _CONTENT, _ARGUMENTS = 0, 1, 2
_Channel = tuple[int, int, int]  # (choice index, kind, tool-call index)


class AnswerScrubber:
    """Scrubs one call's answer: a whole completion, or a stream's deltas as they come."""

    __slots__ = ("_sources", "_held")

    def __init__(self, redactor: Redactor | None, call_secrets: Iterable[str] = ()) -> None:
        sources: list[Redactor] = [redactor] if redactor is not None else []
        # The key sent on this call is normally known already; a redactor of its own covers the
        # rare case where it is not (no shared redactor, or its entry was just dropped).
        extra = [s for s in call_secrets if s and (redactor is None or s not in redactor)]
        if extra:
            sources.append(Redactor(extra))
        self._sources = tuple(r for r in sources if len(r))
        self._held: dict[_Channel, str] = {}

    def text(self, text: str) -> str:
        for source in self._sources:
            text = source.redact_known(text)
        return text

    def completion(self, completion: chat_pb2.ChatCompletion) -> None:
        """Scrub every text field of a completion, in place."""
        if not self._sources:
            return
        text = self.text
        completion.id = text(completion.id)
        completion.model = text(completion.model)
        completion.system_fingerprint = text(completion.system_fingerprint)
        for choice in completion.choices:
            message = choice.message
            message.content = text(message.content)
            message.reasoning_content = text(message.reasoning_content)
            for call in message.tool_calls:
                call.id = text(call.id)
                call.name = text(call.name)
                call.arguments = text(call.arguments)

    def streamed(self, texts: list[StreamedText]) -> list[StreamedText]:
        """`streamed_texts` as the deltas carried them: scrubbed. No secret spans a point where
        `events` released text, so a channel's deltas joined equal its whole text scrubbed."""
        if not self._sources:
            return texts
        text = self.text
        return [
            (text(content), text(reasoning), tuple(text(a) for a in arguments))
            for content, reasoning, arguments in texts
        ]

    def events(
        self, events: Iterable[chat_pb2.StreamCreateResponse]
    ) -> Iterable[chat_pb2.StreamCreateResponse]:
        """The delta events scrubbed, in order; an event left with nothing to carry is dropped."""
        if not self._sources:
            return events
        out: list[chat_pb2.StreamCreateResponse] = []
        for event in events:
            if not event.HasField("delta") or self._scrub_delta(event.delta):
                out.append(event)
        return out

    def flush(self) -> list[chat_pb2.StreamCreateResponse]:
        """Delta events with everything still held back (call at the end of the stream)."""
        out: list[chat_pb2.StreamCreateResponse] = []
        for choice in sorted({channel[0] for channel in self._held}):
            event = chat_pb2.StreamCreateResponse()
            event.delta.SetInParent()
            if choice:
                event.delta.index = choice
            self._release_choice(choice, event.delta)
            out.append(event)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _channel(self, channel: _Channel, text: str) -> str:
        """What of `text` (after what this channel held) can go out now; keeps the rest."""
        held = self._held.pop(channel, None)
        pending = self.text(held + text if held else text)
        cut = len(pending)
        for source in self._sources:
            cut = min(cut, source.hold_from(pending))
        if cut < len(pending):
            self._held[channel] = pending[cut:]
        return pending[:cut]

    def _release(self, channel: _Channel) -> str:
        return self.text(self._held.pop(channel, ""))

    def _scrub_delta(self, delta: chat_pb2.ChatCompletionDelta) -> bool:
        # Each field is read once and written only when scrubbing changed it: this runs per delta.
        choice = delta.index
        reasoning = delta.reasoning_content
        if reasoning:
            scrubbed = self._channel((choice, _REASONING, 0), reasoning)
            if scrubbed != reasoning:
                delta.reasoning_content = reasoning = scrubbed
        content = delta.content
        if content:
            scrubbed = self._channel((choice, _CONTENT, 0), content)
            if scrubbed != content:
                delta.content = content = scrubbed
        calls = delta.tool_calls
        if calls:
            self._scrub_fragments(choice, delta)
        if delta.finish_reason:
            self._release_choice(choice, delta)
            return True
        return bool(content or reasoning or len(delta.tool_calls))

    def _scrub_fragments(self, choice: int, delta: chat_pb2.ChatCompletionDelta) -> None:
        fragments: list[chat_pb2.ToolCallDelta] = []
        for fragment in delta.tool_calls:
            if fragment.id or fragment.name:
                # A new call starts: what earlier calls of this choice hold is their end.
                for channel in [c for c in self._held if c[0] == choice and c[1] == _ARGUMENTS]:
                    if channel[2] != fragment.index:
                        fragments.append(
                            chat_pb2.ToolCallDelta(index=channel[2], arguments=self._release(channel))
                        )
            copy = chat_pb2.ToolCallDelta()
            copy.CopyFrom(fragment)
            copy.id = self.text(copy.id)
            copy.name = self.text(copy.name)
            if copy.arguments:
                copy.arguments = self._channel((choice, _ARGUMENTS, copy.index), copy.arguments)
            if copy.id or copy.name or copy.arguments:
                fragments.append(copy)
        delta.ClearField("tool_calls")
        delta.tool_calls.extend(fragments)

    def _release_choice(self, choice: int, delta: chat_pb2.ChatCompletionDelta) -> None:
        """Append everything held for `choice` to `delta` (its finish, or the end of the stream)."""
        for channel in [c for c in self._held if c[0] == choice]:
            released = self._release(channel)
            if not released:
                continue
            kind = channel[1]
            if kind == _REASONING:
                delta.reasoning_content += released
            elif kind == _CONTENT:
                delta.content += released
            else:
                for fragment in reversed(delta.tool_calls):
                    if fragment.index == channel[2]:
                        fragment.arguments += released
                        break
                else:
                    delta.tool_calls.add(index=channel[2], arguments=released)
