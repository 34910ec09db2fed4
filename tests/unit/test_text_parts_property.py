"""TextParts against a plain "".join: any pieces, any block size, text() at any point."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from server.core import stream
from server.core.stream import StreamAccumulator, TextParts

# Empty pieces, non-ASCII, astral and lone surrogates (a str may carry them; join must not care).
_PIECES = st.one_of(
    st.sampled_from(["", "a", "é", "𝄞", "\ud800", "\udfff", "日本"]),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=5),
)
_OPS = st.lists(
    st.one_of(st.tuples(st.just("append"), _PIECES), st.just(("text", "")), st.just(("fold", ""))),
    max_size=400,
)


@contextmanager
def _block(size: int) -> Iterator[None]:
    # A small block reaches many levels (2 ** 9 pieces: 8 levels) in a few hundred pieces.
    saved = stream._BLOCK
    stream._BLOCK = size
    try:
        yield
    finally:
        stream._BLOCK = saved


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([2, 3, 5, 32]), _OPS)
def test_text_is_the_join_of_the_pieces_in_order(block: int, ops: list[tuple[str, str]]) -> None:
    with _block(block):
        parts = TextParts()
        pieces: list[str] = []
        for op, piece in ops:
            if op == "append":
                parts.append(piece)
                pieces.append(piece)
            elif op == "fold":  # folding early (fewer than a block loose) keeps the order too
                parts.fold()
            else:
                assert parts.text() == "".join(pieces)  # a partial answer, mid-stream
            assert parts.strs() <= block * (len(parts._levels) + 1)
        assert parts.text() == "".join(pieces)
        assert parts.text() == parts.text()  # text() takes nothing away


def test_distinct_pieces_past_four_levels_at_the_real_block_size() -> None:
    # 200,000 pieces: four levels of 32 (32 ** 3 = 32,768 pieces a str at the top), checked at
    # the level boundaries, where the cascade empties a level into the next.
    parts = TextParts()
    pieces: list[str] = []
    checks = {31, 32, 33, 1023, 1024, 1025, 32767, 32768, 32769, 65536, 199_999}
    for i in range(200_000):
        piece = f"{i}," if i % 7 else ""
        parts.append(piece)
        pieces.append(piece)
        if i in checks:
            assert parts.text() == "".join(pieces), i
    assert parts.text() == "".join(pieces)
    assert parts.strs() <= 4 * (stream._BLOCK - 1) + stream._BLOCK


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([2, 3, 32]),
    st.lists(st.tuples(st.sampled_from(["content", "reasoning", "args0", "args1"]), _PIECES), max_size=300),
)
def test_the_accumulator_keeps_every_field_in_order(block: int, deltas: list[tuple[str, str]]) -> None:
    # add() inlines TextParts.append for content; reasoning and arguments go through append.
    with _block(block):
        accumulator = StreamAccumulator()
        expected: dict[str, list[str]] = {"content": [], "reasoning": [], "args0": [], "args1": []}
        for kind, piece in deltas:
            if kind == "content":
                delta: dict[str, object] = {"content": piece}
            elif kind == "reasoning":
                delta = {"reasoning_content": piece}
            else:
                index = int(kind[-1])
                delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            accumulator.add({"id": "c", "choices": [{"index": 0, "delta": delta}]})
            expected[kind].append(piece)
        if not accumulator.choices:
            return
        parts = accumulator.choices[0]
        assert parts.content.text() == "".join(expected["content"])
        assert parts.reasoning.text() == "".join(expected["reasoning"])
        for index in (0, 1):
            call = parts.tool_calls.get(index)
            assert (call.arguments.text() if call else "") == "".join(expected[f"args{index}"])
