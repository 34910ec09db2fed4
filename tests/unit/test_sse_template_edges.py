"""The SSE parser's one-event read (partition + removeprefix) and the OpenAI decoder's template
(removeprefix/removesuffix) against the line-by-line parser and a full parse of every event, on
one stream full of edge cases, cut at every byte: whatever the reads, the same chunks, errors
and end as the general code gives.

The stream mixes what the fast paths must not take (CRLF and CR line ends, `data:` without a
space, comments, `event:` lines, multi-line data, text whose content is the template's prefix
or suffix, escapes, unicode, empty text, a chunk changing another field while its text fits)
with the usual one-event reads the fast paths do take.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from server.providers import openai_compat
from server.providers.openai_compat import OpenAIStreamDecoder, _SSEParser
from tests.unit.test_stream_fast_paths import LineParser, _batches, _Pieces


class ParsingDecoder(OpenAIStreamDecoder):
    """The decoder that never learns a template: every event parsed in full."""

    def __init__(self) -> None:
        super().__init__(provider="p", scrub=str)
        self._learns = 0


def _chunk(content: str | None = "x", **changes: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta.update(changes.pop("delta", {}))
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    choice.update(changes.pop("choice", {}))
    chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1760000000}
    chunk["model"] = "m"
    chunk.update(changes)
    chunk["choices"] = [choice]
    return chunk


# Text chunks the template builds, and ones it must leave to the parser (each ends up the same).
_TEXTS = [
    "tok ",
    "",
    "é 日本語 👍🏽",
    "}]}",
    '"}],"x":"',
    "a\\b",
    "tab\t",
    "\u2028",
    '{"id":"c1"',
    "llmgw",
    " ",
]


def _events() -> list[bytes]:
    chunks = [_chunk(None, delta={"role": "assistant"})]
    for text in _TEXTS:
        chunks.append(_chunk(text))
        chunks.append(_chunk("next"))
    chunks += [
        _chunk("same text", id="c2"),
        _chunk("same text", model="m2"),
        _chunk("same text", choice={"finish_reason": "length"}),
        _chunk("same text", delta={"role": "assistant"}),
        _chunk("same text", delta={"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f"}}]}),
        _chunk("same text", choice={"index": 1}),
        _chunk("tok"),
    ]
    return [orjson.dumps(c) for c in chunks]


def _body(events: list[bytes], style: str) -> bytes:
    dumps = [json.dumps(orjson.loads(e)).encode() for e in events] if style == "spaced" else events
    out = []
    for n, data in enumerate(dumps):
        if n == 3:
            out.append(b": keep-alive\n\n")
        if n == 5:
            out.append(b"event: message\n")
        if n == 7:  # no space after the colon
            out.append(b"data:" + data + b"\n\n")
            continue
        if n == 9:  # multi-line data (the parts joined with a LF: JSON whitespace)
            head, _, tail = data.partition(b",")
            out.append(b"data: " + head + b",\ndata: " + tail + b"\n\n")
            continue
        if n == 11:
            out.append(b"data: " + data + b"\r\n\r\n")
            continue
        if n == 13:
            out.append(b"data: " + data + b"\r\r")
            continue
        if n == 15:
            out.append(b"data: " + data + b"\n\n\n")
            continue
        out.append(b"data: " + data + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


async def _both(pieces: list[bytes]) -> None:
    reads = _Pieces(pieces), _Pieces(pieces)
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    got = await _batches(_SSEParser(reads[0], provider="p", decoder=decoder))  # type: ignore[arg-type]
    want = await _batches(LineParser(reads[1], provider="p", decoder=ParsingDecoder()))  # type: ignore[arg-type]
    assert got == want, pieces


@pytest.mark.parametrize("style", ["compact", "spaced"])
async def test_every_single_cut_gives_what_the_general_code_gives(style: str) -> None:
    body = _body(_events(), style)
    await _both([body])
    for at in range(1, len(body)):
        await _both([body[:at], body[at:]])


@pytest.mark.parametrize("style", ["compact", "spaced"])
async def test_event_per_read_and_byte_per_read(style: str) -> None:
    body = _body(_events(), style)
    # One read per event (the one-event path's case), splitting after every blank line.
    pieces = [p + b"\n\n" for p in body.split(b"\n\n") if p]
    assert b"".join(pieces) == body
    await _both(pieces)
    await _both([body[i : i + 1] for i in range(len(body))])


async def test_the_template_builds_the_plain_chunks_of_this_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # The comparisons above mean something only if the fast paths ran: count the full parses.
    body = _body(_events(), "compact")
    pieces = [p + b"\n\n" for p in body.split(b"\n\n") if p]
    parsed = 0
    decode = openai_compat._decode_event

    def counted(data: bytes, provider: str, scrub: Any) -> dict[str, Any] | None:
        nonlocal parsed
        parsed += 1
        return decode(data, provider, scrub)

    monkeypatch.setattr(openai_compat, "_decode_event", counted)
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    batches = await _batches(_SSEParser(_Pieces(pieces), provider="p", decoder=decoder))  # type: ignore[arg-type]
    events = sum(len(b) for b in batches)
    assert events == len(_events()) + 1  # and [DONE]
    assert events - parsed >= 10, (parsed, events)
