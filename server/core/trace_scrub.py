"""Scrubbing a trace's request and answer JSON: inline when small, in the offload pool when huge.

The redactor costs ~7 ns per character on ordinary JSON and far more on text full of `key=`-like
matches (30 MB: 0.2 to 3 s): a request of 8,000,000 characters or an answer of 63 MiB scrubbed on
the loop would stall every other call of the worker. Texts over `SCRUB_INLINE_MAX` characters
are therefore scrubbed by `offload.run`, and the trace is queued when that is done
(`TraceWriter.enqueue_after`, awaited by the writer's flush and close). Small ones, every normal
call, stay inline: no thread hop on the hot path. Nothing is written before it is scrubbed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from server.core import offload
from server.traces.base import TraceRecord

SCRUB_INLINE_MAX = 256 * 1024  # characters


class TraceQueue(Protocol):
    def enqueue(self, record: TraceRecord) -> None: ...

    def enqueue_after(self, record: TraceRecord, ready: Awaitable[object]) -> None: ...


def scrub_request(text: str, scrub: Callable[[str], str]) -> str:
    """The request JSON of a new trace: scrubbed, or as it is when huge (`queue` scrubs it then)."""
    return text if len(text) > SCRUB_INLINE_MAX else scrub(text)


def queue(record: TraceRecord, scrub: Callable[[str], str], sink: TraceQueue) -> None:
    """Scrub the answer of a finished trace, and a huge request `scrub_request` left, then queue it.

    A request over the bound is scrubbed again even if `scrub_request` scrubbed it (redactions
    made it grow past the bound): scrubbing is idempotent, and that is rare.
    """
    huge_request = len(record.request_json) > SCRUB_INLINE_MAX
    huge_response = len(record.response_json) > SCRUB_INLINE_MAX
    if record.response_json and not huge_response:
        # An upstream (a debugging proxy, say) may echo a key back, even split over chunks.
        record.response_json = scrub(record.response_json)
    if not (huge_request or huge_response):
        sink.enqueue(record)
        return

    def scrub_huge() -> None:  # in a pool thread; nothing else touches the record meanwhile
        if huge_request:
            record.request_json = scrub(record.request_json)
        if huge_response:
            record.response_json = scrub(record.response_json)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not on the loop (no caller does this today): scrub right here
        scrub_huge()
        sink.enqueue(record)
        return
    sink.enqueue_after(record, offload.run(scrub_huge))
