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

from server.auth.redact import REDACTED, Redactor
from server.core.completion import StreamedText

_REASONING, _CONTENT, _ARGUMENTS, _ID, _NAME = 0, 1, 2, 3, 4
_Channel = tuple[int, int, int]  # (choice index, kind, tool-call index)
# A tool call's id and name are relayed whole, never cut (clients that take the name of a
# fragment as the whole name must keep working): a fragment whose end may begin a secret is held
# whole until the next fragment of its call. Tails shorter than this are let through (a name
# ending in "s" when a key starts "sk-"); the few characters let through are remembered, so a
# secret continued in the next fragment is still found.
_FIELD_HOLD = 4


class AnswerScrubber:
    """Scrubs one call's answer: a whole completion, or a stream's deltas as they come."""

    __slots__ = ("_sources", "_held", "_context")

    def __init__(self, redactor: Redactor | None, call_secrets: Iterable[str] = ()) -> None:
        sources: list[Redactor] = [redactor] if redactor is not None else []
        # The key sent on this call is normally known already; a redactor of its own covers the
        # rare case where it is not (no shared redactor, or its entry was just dropped).
        extra = [s for s in call_secrets if s and (redactor is None or s not in redactor)]
        if extra:
            sources.append(Redactor(extra))
        self._sources = tuple(r for r in sources if len(r))
        self._held: dict[_Channel, str] = {}
        self._context: dict[_Channel, str] = {}  # what went out last: ids, names, at a finish

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
            message.refusal = text(message.refusal)
            for block in message.thinking_blocks:
                # The reasoning text only: signatures and redacted data are the provider's opaque
                # (encrypted) bytes, which must go back unchanged and cannot carry a key as text.
                block.text = text(block.text)
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
        if isinstance(events, list | tuple) and len(events) == 1:  # (`relay.relayed` does it before)
            delta = events[0].delta
            content = delta.content
            if content and not (delta.reasoning_content or delta.tool_calls) and self.lets_out(content):
                return events
        out: list[chat_pb2.StreamCreateResponse] = []
        for event in events:
            if not event.HasField("delta") or self._scrub_delta(event.delta):
                out.append(event)
        return out

    def lets_out(self, content: str) -> bool:
        """Whether a delta of text content alone (a finish reason may come with it) goes out
        exactly as it is: nothing is held back (a finish releases nothing) and no known secret
        can begin in the text (`Redactor.may_touch`). The usual delta: the caller then skips
        `events`, which would change nothing."""
        if self._held or self._context:
            return False
        for source in self._sources:
            if source.may_touch(content):
                return False
        return True

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

    def _cut(self, pending: str) -> tuple[int, bool]:
        """Where the tail to hold back starts: the earliest position whose suffix may begin a
        known spelling, moved before any known spelling it would cut in two (a secret that is a
        prefix of another one is held whole until the text decides which one it is); and whether
        `pending` holds a known spelling at all (when nothing is held: not looked at, True)."""
        cut = len(pending)
        for source in self._sources:
            cut = min(cut, source.hold_from(pending))
        if cut == len(pending):
            return cut, True
        spans = [
            (start, start + len(spelling))
            for source in self._sources
            for spelling in source.known_in(pending)
            for start in _starts(pending, spelling)
        ]
        moved = True
        while moved:
            moved = False
            for begin, end in spans:
                if begin < cut < end:
                    cut, moved = begin, True
        return cut, bool(spans)

    def _channel(self, channel: _Channel, text: str) -> str:
        """What of `text` (after what this channel held) can go out now; keeps the rest."""
        held = self._held.pop(channel, None)
        pending = held + text if held else text
        if self._context and channel in self._context:
            # More text after this channel's choice finished (an upstream out of protocol): what
            # the finish let out may have begun a secret; the rest of it does not follow.
            pending = self._continued(self._context.pop(channel), pending)
        for source in self._sources:
            if source.may_touch(pending):
                break
        else:
            # No known spelling can begin anywhere in it (the usual delta): `_cut` would hold
            # nothing back and `text` change nothing.
            return pending
        cut, known = self._cut(pending)
        if cut < len(pending):
            self._held[channel] = pending[cut:]
            pending = pending[:cut]
        return self.text(pending) if known else pending

    def _field(self, channel: _Channel, text: str) -> str:
        """A tool call's id or name fragment: all of it now, or held whole until the next one."""
        held = self._held.pop(channel, "")
        context = self._context.get(channel, "")
        pending = held + text
        combined = context + pending
        if len(combined) - self._cut(combined)[0] >= _FIELD_HOLD:
            self._held[channel] = pending
            return ""
        return self._let_out(channel, context, pending)

    def _let_out(self, channel: _Channel, context: str, pending: str) -> str:
        combined = context + pending
        pending = self._continued(context, pending)
        self._context[channel] = combined[-(_FIELD_HOLD - 1) :]
        return self.text(pending)

    def _continued(self, context: str, pending: str) -> str:
        """`pending` without the rest of a known spelling begun in `context` (already let out)."""
        if not context:
            return pending
        combined = context + pending
        ends = [
            start + len(spelling)
            for source in self._sources
            for spelling in source.known_in(combined)
            for start in _starts(combined, spelling)
            if start < len(context) < start + len(spelling)
        ]
        if not ends:
            return pending
        return REDACTED + pending[max(ends) - len(context) :]

    def _release(self, channel: _Channel) -> str:
        held = self._held.pop(channel, "")
        if channel[1] in (_ID, _NAME):
            return self._let_out(channel, self._context.get(channel, ""), held) if held else ""
        return self.text(held)

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
        # A new call starting does not release what an earlier call holds: its arguments may go
        # on later (fragments are by index), and what is held goes out at the finish at the latest.
        fragments: list[chat_pb2.ToolCallDelta] = []
        for fragment in delta.tool_calls:
            copy = chat_pb2.ToolCallDelta()
            copy.CopyFrom(fragment)
            index = copy.index
            id_channel, name_channel = (choice, _ID, index), (choice, _NAME, index)
            if copy.id or id_channel in self._held:
                copy.id = self._field(id_channel, copy.id) if copy.id else self._release(id_channel)
            if copy.name or name_channel in self._held:
                copy.name = self._field(name_channel, copy.name) if copy.name else self._release(name_channel)
            if copy.arguments:
                copy.arguments = self._channel((choice, _ARGUMENTS, index), copy.arguments)
            if copy.id or copy.name or copy.arguments:
                fragments.append(copy)
        delta.ClearField("tool_calls")
        delta.tool_calls.extend(fragments)

    def _release_choice(self, choice: int, delta: chat_pb2.ChatCompletionDelta) -> None:
        """Append everything held for `choice` to `delta` (its finish, or the end of the stream)."""
        for channel in [c for c in self._held if c[0] == choice]:
            if channel[1] not in (_ID, _NAME):
                self._context[channel] = self._held[channel]
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
                        break
                else:
                    fragment = delta.tool_calls.add(index=channel[2])
                if kind == _ID:
                    fragment.id += released
                elif kind == _NAME:
                    fragment.name += released
                else:
                    fragment.arguments += released


def _starts(text: str, spelling: str) -> Iterable[int]:
    start = text.find(spelling)
    while start >= 0:
        yield start
        start = text.find(spelling, start + 1)
