"""Review of issue 12 items 7, 8 and 13 (streams): unit tests.

Token counts of long texts: tiktoken's BPE is super-linear in the length of one regex piece (a run
of letters without a space: 0.4 M characters 0.16 s, 0.8 M 0.36 s, 1.6 M 0.90 s), which made the
usage count of a big answer that came without usage take about a minute. Long texts are counted in
slices now; these tests pin that down."""

from __future__ import annotations

import random
import string
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.core import tokens
from server.errors import UpstreamBadResponse
from server.providers.local import provider as local_provider
from server.providers.openai_compat import MAX_EVENT_BYTES, LineReader, sse_batches

ROOT = Path(__file__).resolve().parents[2]


def _random(alphabet: str, size: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(alphabet, k=size))


@pytest.fixture(params=["gpt-4", "gpt-4o"])
def encoding(request: pytest.FixtureRequest) -> Any:
    return tokens.encoding_for_model(request.param)[0]


class _Spy:
    """Records the length of every text tiktoken is asked to encode."""

    def __init__(self, encoding: Any) -> None:
        self.lengths: list[int] = []
        self._encode = encoding.encode_ordinary

    def __call__(self, text: str) -> list[int]:
        self.lengths.append(len(text))
        result: list[int] = self._encode(text)
        return result


@pytest.fixture
def spy(encoding: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    recorder = _Spy(encoding)
    monkeypatch.setattr(encoding, "encode_ordinary", recorder)
    yield recorder


def test_a_long_run_without_spaces_is_encoded_in_bounded_slices(encoding: Any, spy: _Spy) -> None:
    # The work is linear because no single encode sees more than SLICE_CHARS characters, and the
    # slices cover the text once; the time bound is only a safety net (whole: ~1 s, and n^1.3).
    text = _random(string.ascii_lowercase, 1_600_000, seed=1)
    started = time.process_time()
    counted = tokens.encoded_length(encoding, text)
    assert time.process_time() - started < 10
    assert spy.lengths, "nothing was encoded"
    assert max(spy.lengths) <= tokens.SLICE_CHARS, "one encode saw more than a slice"
    assert sum(spy.lengths) == len(text)
    assert min(spy.lengths[:-1]) >= tokens.SLICE_CHARS // 2  # no degenerate tiny slices
    assert 0.4 * len(text) < counted < 0.7 * len(text)


def test_a_text_up_to_the_slice_size_is_encoded_whole(encoding: Any, spy: _Spy) -> None:
    text = _random(string.ascii_lowercase, tokens.SLICE_CHARS, seed=2)
    tokens.encoded_length(encoding, text)
    assert spy.lengths == [tokens.SLICE_CHARS]


def _whole(encoding: Any, text: str) -> int:
    return len(encoding.encode_ordinary(text))


@pytest.mark.parametrize(
    "sample",
    [
        "prose",
        "code",
        "cjk-with-punctuation",
        "mixed",
        "base64-with-newlines",
    ],
)
def test_cuts_at_spaces_and_punctuation_keep_counts_exact(
    encoding: Any, monkeypatch: pytest.MonkeyPatch, sample: str
) -> None:
    # Slices of 512 characters instead of 64 Ki: many cuts on small inputs, each must be exact.
    monkeypatch.setattr(tokens, "SLICE_CHARS", 512)
    readme = (ROOT / "README.md").read_text()
    text = {
        "prose": readme,
        "code": (ROOT / "server" / "gateway.py").read_text(),
        "cjk-with-punctuation": _random("".join(map(chr, range(0x4E00, 0x4E40))) + "，。！", 60_000, seed=3),
        "mixed": _random(string.ascii_letters + string.digits + " \n\t.,;:'\"()-", 60_000, seed=4),
        "base64-with-newlines": "\n".join(
            _random(string.ascii_letters + string.digits + "+/", 76, seed=n) for n in range(800)
        ),
    }[sample]
    assert len(tokens.slice_ends(text, 512)) > 20
    assert tokens.encoded_length(encoding, text) == _whole(encoding, text)


@pytest.mark.parametrize(
    "alphabet",
    [
        string.ascii_lowercase,
        "a",
        string.digits,
        " ",
        "!#$%&*+-./:;<=>?@^_|~",
        "".join(map(chr, range(0x4E00, 0x9FFF))),
    ],
    ids=["letters", "one-letter", "digits", "spaces", "punctuation", "cjk"],
)
def test_a_cut_inside_one_regex_piece_costs_about_a_token(
    encoding: Any, monkeypatch: pytest.MonkeyPatch, alphabet: str
) -> None:
    # No space and no punctuation after a letter to cut at: the slice ends at its size, inside
    # one regex piece, and the count may move by about one token per cut (the documented bound;
    # measured at most 1.25 per cut, on whitespace runs).
    monkeypatch.setattr(tokens, "SLICE_CHARS", 1000)
    text = _random(alphabet, 40_000, seed=5)
    cuts = len(tokens.slice_ends(text, 1000)) - 1
    assert cuts >= 39
    assert abs(tokens.encoded_length(encoding, text) - _whole(encoding, text)) <= 1.5 * cuts


def test_slice_ends_cover_the_text_in_order() -> None:
    for text in ("x" * 10_000, ("word " * 3000), ("a" * 700 + " ") * 20, "  " * 5000 + "z"):
        ends = tokens.slice_ends(text, 1000)
        assert ends[-1] == len(text)
        starts = [0, *ends[:-1]]
        assert all(500 <= end - start <= 1000 for start, end in zip(starts[:-1], ends[:-1], strict=True))


async def test_the_answer_usage_count_of_a_long_run_is_sliced_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoding = tokens.encoding_for_model("gpt-4o-mini")[0]
    recorder = _Spy(encoding)
    monkeypatch.setattr(encoding, "encode_ordinary", recorder)
    text = "q" * 400_000
    counted = await tokens.count_texts_async([text, "short answer"], "gpt-4o-mini")
    assert max(recorder.lengths) <= tokens.SLICE_CHARS
    assert counted > 0


def test_a_long_prompt_is_sliced_and_still_exact_when_it_has_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    encoding = tokens.encoding_for_model("gpt-4o")[0]
    tokens.clear_memo()
    text = (ROOT / "README.md").read_text() * 3
    assert len(text) > tokens.SLICE_CHARS
    recorder = _Spy(encoding)
    monkeypatch.setattr(encoding, "encode_ordinary", recorder)
    counted = tokens.count_request_tokens([{"role": "user", "content": text}], None, "gpt-4o")
    assert max(recorder.lengths) <= tokens.SLICE_CHARS
    monkeypatch.undo()
    assert counted.prompt_tokens == 3 + 3 + _whole(encoding, "user") + _whole(encoding, text)


# -- SSE and NDJSON framing --------------------------------------------------------------------


class _Reads:
    """Stands in for server.providers.http.Response: `read_chunk` hands out scripted reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = iter(reads)
        self.reader_state: object = None

    async def read_chunk(self) -> bytes:
        return next(self._reads, b"")


def _chunk(content: str) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]}


def _keep(text: str) -> str:
    return text


async def _events(reads: list[bytes]) -> list[Any]:
    return [e async for batch in sse_batches(_Reads(reads), provider="p", scrub=_keep) for e in batch]


async def test_a_crlf_split_between_reads_is_one_line_end_inside_a_multi_line_event() -> None:
    # Two data lines of one event: were CR and LF two line ends, the first line would be an event
    # of its own ('{"id": "c",' is not JSON).
    reads = [b'data: {"id": "c",\r', b'\ndata: "choices": []}\r', b"\n\r", b"\n", b"data: [DONE]\r\n\r\n"]
    assert await _events(reads) == [{"id": "c", "choices": []}, None]


async def test_a_byte_order_mark_opening_the_stream_is_ignored() -> None:
    # The SSE spec: one leading U+FEFF is ignored. It was kept, so the first line was no `data:`
    # field and the first event was dropped without a word.
    body = b"\xef\xbb\xbf" + b"data: " + orjson.dumps(_chunk("first")) + b"\n\ndata: [DONE]\n\n"
    assert await _events([body]) == [_chunk("first"), None]
    # Split across reads, too.
    assert await _events([body[:1], body[1:2], body[2:]]) == [_chunk("first"), None]


async def test_fields_comments_and_empty_lines_are_skipped() -> None:
    body = (
        b": keep-alive\n\n\n\n"
        + b"event: message\nid: 7\nretry: 1000\ndata:"
        + orjson.dumps(_chunk("a"))
        + b"\n\n"
        + b"\n" * 100_000
        + b"data: [DONE]\n\n"
    )
    assert await _events([body]) == [_chunk("a"), None]
    assert await _events([b": only comments\n\n" * 1000]) == []


def _event_of(size: int) -> dict[str, Any]:
    empty = len(orjson.dumps(_chunk("")))
    return _chunk("x" * (size - empty))


@pytest.mark.parametrize("cut", [0, 6 + MAX_EVENT_BYTES], ids=["one-read", "cut-before-the-line-end"])
async def test_an_event_of_exactly_the_cap_passes_whatever_the_reads(cut: int) -> None:
    # The unfinished line was measured with its "data: " prefix: the same event passed when its
    # line end came in the same read and was refused when it came in the next one.
    event = _event_of(MAX_EVENT_BYTES)
    data = orjson.dumps(event)
    assert len(data) == MAX_EVENT_BYTES
    body = b"data: " + data + b"\n\ndata: [DONE]\n\n"
    reads = [body[:cut], body[cut:]] if cut else [body]
    assert await _events(reads) == [event, None]


async def test_an_event_one_byte_over_the_cap_is_refused_whatever_the_reads() -> None:
    body = b"data: " + orjson.dumps(_event_of(MAX_EVENT_BYTES + 1)) + b"\n\n"
    for read in (65_536, len(body)):
        with pytest.raises(UpstreamBadResponse):
            await _events([body[i : i + read] for i in range(0, len(body), read)])


def _held_after(feed: Any, line: bytes) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(line), 2):  # 2 bytes: 1-byte objects are cached singletons
            feed(line[i : i + 2])
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_line_arriving_a_byte_per_read_is_held_compactly() -> None:
    # One bytes object per read (33 bytes of header, 8 of list slot): a 32 MiB line two bytes at a
    # time held ~700 MB. Held in joined blocks, it costs about its size.
    reader = LineReader()
    line = b"y" * 256 * 1024
    held = _held_after(reader.feed, line)
    assert held < 3 * len(line), held
    assert reader.feed(b"\n") == [line]


async def test_an_ndjson_line_split_at_every_byte_is_one_line() -> None:
    line = orjson.dumps({"message": {"content": "é" * 2000}, "done": True}) + b"\n"
    reads = [line[i : i + 1] for i in range(len(line))]
    batches = local_provider._ndjson_batches(_Reads(reads), provider="ollama", scrub=_keep)
    assert [e async for batch in batches for e in batch] == [orjson.loads(line)]
