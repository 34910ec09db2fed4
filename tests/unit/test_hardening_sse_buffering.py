"""Issue 12 item 7: the SSE and NDJSON readers work in time linear in what they read, cap one
event's size with UPSTREAM_BAD_RESPONSE, and keep the batching and line-ending rules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server.errors import UpstreamBadResponse
from server.providers import openai_compat
from server.providers.local import provider as local_provider
from server.providers.openai_compat import sse_batches, sse_events

# A line this long in reads this small costs the old re-concatenating reader about a minute of
# CPU (8 MB took 11.6 s, quadratic); a linear reader needs well under a second. The bound below
# is a generous wait, not a timing claim.
_BIG = 16 * 1024 * 1024
_READ = 1024
_BOUND_SECONDS = 25.0


class _Reads:
    """Stands in for server.providers.http.Response: `read_chunk` hands out scripted reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = reads
        self._next = 0
        self.reader_state: object = None
        self.handed = 0  # reads handed out

    async def read_chunk(self) -> bytes:
        if self._next >= len(self._reads):
            return b""
        read = self._reads[self._next]
        self._next += 1
        self.handed += 1
        if self._next % 64 == 0:
            await asyncio.sleep(0)  # let a cancellation in now and then
        return read


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _chunk(content: str) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]}


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events
    )


def _scrub(text: str) -> str:
    return text


async def _all_batches(reads: list[bytes]) -> list[list[Any]]:
    return [b async for b in sse_batches(_Reads(reads), provider="p", scrub=_scrub)]


async def test_one_huge_event_in_small_reads_is_read_in_linear_time() -> None:
    big = _chunk("x" * _BIG)
    reads = _split(_sse(big, "[DONE]"), _READ)
    batches = await asyncio.wait_for(_all_batches(reads), _BOUND_SECONDS)
    assert batches == [[big, None]]


async def test_one_huge_ndjson_line_in_small_reads_is_read_in_linear_time() -> None:
    line = json.dumps({"message": {"content": "y" * _BIG}, "done": True}).encode() + b"\n"

    async def read_all() -> list[Any]:
        batches = local_provider._ndjson_batches(_Reads(_split(line, _READ)), provider="ollama", scrub=_scrub)
        return [e async for batch in batches for e in batch]

    events = await asyncio.wait_for(read_all(), _BOUND_SECONDS)
    assert len(events) == 1 and len(events[0]["message"]["content"]) == _BIG


def _assert_cap_error(exc: UpstreamBadResponse, provider: str, limit: int) -> None:
    assert exc.reason == "UPSTREAM_BAD_RESPONSE"
    assert exc.metadata["provider"] == provider
    assert exc.metadata["limit_bytes"] == str(limit)
    assert str(limit) in exc.message


@pytest.mark.parametrize(
    "oversized",
    [
        b"data: " + b"z" * 5000 + b"\n\n",  # one data line
        b"data: [\n" + b"data: 1,\n" * 3000 + b"data: 1]\n\n",  # a multi-line event
        b": " + b"k" * 5000,  # a comment line that never ends
        b"data: " + b"z" * 5000,  # a data line that never ends
    ],
    ids=["line", "multi-line", "endless-comment", "endless-data"],
)
async def test_an_event_over_the_cap_is_a_bad_response_after_the_events_before_it(
    monkeypatch: pytest.MonkeyPatch, oversized: bytes
) -> None:
    monkeypatch.setattr(openai_compat, "MAX_EVENT_BYTES", 4096)
    a = _chunk("a")
    reads = [_sse(a), *_split(oversized, 700), _sse(a)]
    response = _Reads(reads)
    batches = sse_batches(response, provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    with pytest.raises(UpstreamBadResponse) as caught:
        await anext(batches)
    _assert_cap_error(caught.value, "p", 4096)
    # It stopped reading once past the cap: the event after it was never read.
    assert response.handed < len(reads)


async def test_an_event_under_the_cap_still_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "MAX_EVENT_BYTES", 4096)
    a = _chunk("a" * 3000)
    assert await _all_batches(_split(_sse(a), 100)) == [[a]]


async def test_an_ndjson_line_over_the_cap_is_a_bad_response(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "MAX_EVENT_BYTES", 4096)
    first = {"message": {"content": "a"}, "done": False}
    reads = [json.dumps(first).encode() + b"\n", *_split(b'{"message": "' + b"q" * 5000, 600)]
    batches = local_provider._ndjson_batches(_Reads(reads), provider="ollama", scrub=_scrub)
    assert await anext(batches) == [first]
    with pytest.raises(UpstreamBadResponse) as caught:
        await anext(batches)
    _assert_cap_error(caught.value, "ollama", 4096)


async def test_cr_only_line_endings_end_lines_and_events() -> None:
    a, b = _chunk("a"), _chunk("b")
    body = _sse(a, b, "[DONE]").replace(b"\n", b"\r")
    assert await _all_batches([body]) == [[a, b, None]]
    # One read at a time: every event on its own, in order.
    events = [e async for e in sse_events(_Reads(_split(body, 1)), provider="p", scrub=_scrub)]
    assert events == [a, b, None]


async def test_crlf_split_between_reads_is_one_line_end() -> None:
    # A CR at the end of one read and the LF at the start of the next end one line, not two:
    # a second line end would be an empty line and cut the multi-line event in half.
    reads = [b'data: {"id": "c",\r', b'\ndata: "choices": []}\r\n', b"\r\n", b"data: [DONE]\r\n\r\n"]
    assert await _all_batches(reads) == [[{"id": "c", "choices": []}], [None]]


async def test_a_read_that_completes_a_long_line_relays_it_with_the_events_after_it() -> None:
    a, b, c = _chunk("a" * 10_000), _chunk("b"), _chunk("c")
    held = _sse(a)[:-2]  # `a` without its blank line, over eleven reads
    reads = [*_split(held, 999), b"\n\n" + _sse(b, c)]
    assert await _all_batches(reads) == [[a, b, c]]


async def test_comments_fields_and_multi_line_data_are_kept() -> None:
    reads = [
        b": keep-alive\n\nevent: message\nid: 7\nretry: 10\n",
        b'data: {"id": "c",\ndata:  "choices": []}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert await _all_batches(reads) == [[{"id": "c", "choices": []}], [None]]


async def test_many_events_of_one_read_are_handed_out_one_by_one_in_linear_time() -> None:
    # A compressed body inflates up to 4 MiB per read: half a million tiny events in one read.
    # Handing them out with list.pop(0) moved every pointer left for each one (quadratic).
    count = 500_000
    body = b"data: {}\n\n" * count + b"data: [DONE]\n\n"

    async def read_all() -> int:
        n = 0
        async for _ in sse_events(_Reads([body]), provider="p", scrub=_scrub):
            n += 1
            if n % 10_000 == 0:
                await asyncio.sleep(0)  # let the bound's timeout in
        return n

    assert await asyncio.wait_for(read_all(), _BOUND_SECONDS) == count + 1
