"""The delta events a stream relays for the chunks of one network read.

`deltas_from_chunks` makes the events, `tool_call_check.first_call_only` cuts the calls after
the first where at most one was asked for, and the call's `AnswerScrubber` scrubs them. The
usual read is one chunk of text content alone with nothing to scrub: its one event is built
directly (the same event, and the scrubber's state stays the same, as the three steps give).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmgateway.v1 import chat_pb2

from server.core import tool_call_check
from server.core.answer_scrub import AnswerScrubber
from server.core.completion import deltas_from_chunks, plain_choice, plain_event


def relayed(
    chunks: list[dict[str, Any] | None], want: tool_call_check.Expected, scrubber: AnswerScrubber
) -> Iterable[chat_pb2.StreamCreateResponse]:
    """The events to send for `chunks` (what arrived together, up to a None for `[DONE]`)."""
    if len(chunks) == 1:
        plain = plain_choice(chunks[0])
        # No calls: first_call_only keeps the event; nothing held and no secret can begin in
        # the text: the scrubber lets it out unchanged.
        if plain is not None:
            choice, content = plain
            if scrubber.lets_out(content):
                return (plain_event(choice, content),)
    return scrubber.events(tool_call_check.first_call_only(deltas_from_chunks(chunks), want))


# The serialized head of a StreamCreateResponse whose delta is `content` alone, by the content's
# UTF-8 length n: field 1 (the delta, length n + 2), its field 2 (the content, length n). One-byte
# lengths only: n + 2 < 128.
_PLAIN_HEADS = tuple(bytes((0x0A, n + 2, 0x12, n)) for n in range(126))


def plain_wire(choice: dict[str, Any], content: str) -> bytes | chat_pb2.StreamCreateResponse:
    """`plain_event(choice, content)`, serialized: the usual delta of a paced stream (text
    content alone, choice 0, no finish reason, under 126 bytes) as its wire bytes, built without
    a message object (`handlers` sends bytes as they are); any other the event itself."""
    if not choice.get("index") and not choice.get("finish_reason"):
        try:
            raw = content.encode()
        except UnicodeEncodeError:  # a lone surrogate: the message refuses it, as it did
            raw = b""
        if 0 < len(raw) < 126:
            return _PLAIN_HEADS[len(raw)] + raw
    return plain_event(choice, content)
