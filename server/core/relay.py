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
