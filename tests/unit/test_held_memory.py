"""What a held stream keeps in memory: bounds on the objects that live as long as the call."""

from __future__ import annotations

import tracemalloc

import orjson

from server.core.stream import _BLOCK, StreamAccumulator, TextParts
from server.gateway import _translated
from server.providers.registry import provider_for


def test_text_parts_join_every_block_and_cascade() -> None:
    parts = TextParts()
    pieces = [f"t{i} " for i in range(_BLOCK**3 + 5 * _BLOCK + 7)]
    kept_max = 0
    for piece in pieces:
        parts.append(piece)
        kept_max = max(kept_max, parts.strs())
    assert parts.text() == "".join(pieces)
    # At most _BLOCK - 1 strs wait per level (3 levels besides the loose pieces here).
    assert kept_max <= 4 * _BLOCK
    assert parts.strs() == 7 + 5 + 1


def test_text_parts_text_at_every_length() -> None:
    parts = TextParts()
    assert not parts and parts.text() == ""
    expected = []
    for i in range(3 * _BLOCK * _BLOCK + 3):
        parts.append(str(i))
        expected.append(str(i))
        assert parts and parts.text() == "".join(expected)


def test_a_held_stream_of_200_tokens_keeps_few_strs() -> None:
    # 256-piece blocks kept one str per token: ~15 KiB of headers per held 200-token stream.
    accumulator = StreamAccumulator()
    for i in range(200):
        accumulator.add({"id": "c", "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]})
    content = accumulator.choices[0].content
    assert content.strs() <= 2 * _BLOCK
    assert content.text() == "".join(f"tok{i} " for i in range(200))


def test_the_payload_holds_no_spare_buffer() -> None:
    # orjson's output keeps its working buffer (~8x its length); the payload lives for the call.
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "system", "content": "You are helpful. " * 120}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    tracemalloc.start(1)
    try:
        _notes, payload = _translated(provider_for("openai"), body, True)
        where = tracemalloc.get_object_traceback(payload)
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert where is not None
    held = sum(trace.size for trace in snapshot.traces if trace.traceback == where)
    assert len(payload) > 2000
    assert held <= len(payload) + 64, (held, len(payload))


def test_a_payload_over_a_mebibyte_is_not_copied_but_is_the_same_bytes() -> None:
    # A huge body's unused buffer tail is untouched pages (no RSS); copying it would hold the
    # loop tens of milliseconds. Whichever branch, the bytes sent are orjson's.
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    _notes, payload = _translated(provider_for("openai"), body, False)
    upstream, _ = provider_for("openai").build_body(body, stream=False)
    assert len(payload) > 2 << 20
    assert payload == orjson.dumps(upstream)
