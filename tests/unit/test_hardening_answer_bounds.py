"""Issue 12 items 8 and 13: what an upstream answers is bounded before it is relayed or kept.

Choices per answer, tool calls per choice, index values, label lengths (id, model, names) and the
answer's size (LLMGW_MAX_ANSWER_BYTES) each end the call with UPSTREAM_BAD_RESPONSE naming the
limit; the accumulated text is kept compactly.
"""

from __future__ import annotations

import argparse
import tracemalloc
from typing import Any

import pytest

from server.config import DEFAULT_MAX_ANSWER_BYTES, add_arguments, load_settings
from server.core.completion import (
    MAX_CHOICES,
    MAX_LABEL_CHARS,
    MAX_TOOL_CALLS,
    answer_bytes,
    check_answer_size,
    completion_from_json,
)
from server.core.stream import StreamAccumulator
from server.errors import UpstreamBadResponse
from server.providers.openai_compat import check_shape, parse_json_object


def _chunk(delta: dict[str, Any], *, index: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": "c", "model": "m", "choices": [{"index": index, "delta": delta}], **fields}


def _scrub(text: str) -> str:
    return text


def test_limits_are_documented_values() -> None:
    assert (MAX_CHOICES, MAX_TOOL_CALLS, MAX_LABEL_CHARS) == (16, 128, 1024)


def test_a_chunk_with_too_many_choices_is_refused() -> None:
    many = {"choices": [{"index": i, "delta": {"content": "x"}} for i in range(100_000)]}
    with pytest.raises(UpstreamBadResponse) as caught:
        check_shape(many, provider="p")
    assert caught.value.metadata == {"provider": "p", "field": "choices", "count": "100000", "limit": "16"}
    check_shape({"choices": [{"index": i, "delta": {}} for i in range(MAX_CHOICES)]}, provider="p")


def test_a_unary_answer_with_too_many_choices_is_refused() -> None:
    body = (
        b'{"choices": [' + b",".join(b'{"index": 0, "message": {"content": "x"}}' for _ in range(17)) + b"]}"
    )
    with pytest.raises(UpstreamBadResponse):
        parse_json_object(body, provider="p", scrub=_scrub)


@pytest.mark.parametrize(
    ("where", "payload"),
    [
        ("choices[0].index", {"choices": [{"index": 10**9, "delta": {}}]}),
        (
            "choices[0].delta.tool_calls[0].index",
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 10**9}]}}]},
        ),
        (
            "choices[0].message.tool_calls",
            {"choices": [{"index": 0, "message": {"tool_calls": [{"index": 0}] * 129}}]},
        ),
    ],
)
def test_index_values_and_tool_call_counts_are_bounded(where: str, payload: dict[str, Any]) -> None:
    with pytest.raises(UpstreamBadResponse) as caught:
        check_shape(payload, provider="p")
    assert caught.value.metadata["field"] == where


@pytest.mark.parametrize("field", ["id", "model", "system_fingerprint"])
def test_a_huge_label_is_refused_in_the_completion(field: str) -> None:
    # Streamed chunks repeat them, the accumulator keeps the latest: checked once, at the end.
    body: dict[str, Any] = {"choices": [{"index": 0, "message": {"content": "x"}}]}
    with pytest.raises(UpstreamBadResponse) as caught:
        completion_from_json({**body, field: "x" * (MAX_LABEL_CHARS + 1)}, provider="p")
    assert caught.value.metadata == {"provider": "p", "field": field, "limit": str(MAX_LABEL_CHARS)}
    completion_from_json({**body, field: "x" * MAX_LABEL_CHARS}, provider="p")
    accumulator = StreamAccumulator(provider="p")
    accumulator.add({**_chunk({"content": "x"}), field: "y" * 5000})
    with pytest.raises(UpstreamBadResponse):
        completion_from_json(accumulator.completion(), provider="p")


def test_tool_call_ids_and_names_count_against_the_answer_cap() -> None:
    accumulator = StreamAccumulator(provider="p", max_answer_bytes=3000)
    accumulator.add(_chunk({"tool_calls": [{"index": 0, "id": "i" * 2000, "function": {"name": "n"}}]}))
    with pytest.raises(UpstreamBadResponse):
        accumulator.add(_chunk({"tool_calls": [{"index": 1, "id": "j", "function": {"name": "m" * 2000}}]}))


def test_the_accumulator_bounds_choices_across_chunks() -> None:
    accumulator = StreamAccumulator(provider="p")
    for index in range(MAX_CHOICES):
        accumulator.add(_chunk({"content": "x"}, index=index))
    with pytest.raises(UpstreamBadResponse) as caught:
        accumulator.add(_chunk({"content": "x"}, index=MAX_CHOICES))
    assert caught.value.metadata["limit"] == str(MAX_CHOICES)


def test_the_accumulator_bounds_tool_calls_without_index() -> None:
    # Index-less fragments with a new id each start a new call (Gemini's style): bounded too.
    accumulator = StreamAccumulator(provider="p")
    for n in range(MAX_TOOL_CALLS):
        accumulator.add(_chunk({"tool_calls": [{"id": f"call_{n}", "function": {"name": "f"}}]}))
    with pytest.raises(UpstreamBadResponse) as caught:
        accumulator.add(_chunk({"tool_calls": [{"id": "call_x", "function": {"name": "f"}}]}))
    assert caught.value.metadata["limit"] == str(MAX_TOOL_CALLS)
    assert len(accumulator.completion()["choices"][0]["message"]["tool_calls"]) == MAX_TOOL_CALLS


def test_the_accumulator_caps_the_answer_size_in_utf8_bytes() -> None:
    accumulator = StreamAccumulator(provider="p", max_answer_bytes=100)
    accumulator.add(_chunk({"content": "é" * 20, "reasoning_content": "r" * 20}))  # 40 + 20 bytes
    accumulator.add(_chunk({"tool_calls": [{"index": 0, "id": "i", "function": {"name": "f"}}]}))
    accumulator.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "a" * 38}}]}))
    assert accumulator.size == 100
    with pytest.raises(UpstreamBadResponse) as caught:
        accumulator.add(_chunk({"content": "!"}))
    assert caught.value.metadata == {"provider": "p", "limit_bytes": "100", "answer_bytes": "101"}
    assert "LLMGW_MAX_ANSWER_BYTES" in caught.value.message


def test_answer_bytes_of_a_unary_answer_counts_every_text() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "content": "ab",
                    "reasoning_content": "é",
                    "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}],
                },
            },
            {"index": 1, "message": {"content": [{"type": "text", "text": "cd"}]}},
        ]
    }
    assert answer_bytes(body) == 2 + 2 + (1 + 1 + 2) + 2
    check_answer_size(10, 10, provider="p")
    with pytest.raises(UpstreamBadResponse) as caught:
        check_answer_size(answer_bytes(body), 9, provider="p")
    assert caught.value.metadata == {"provider": "p", "limit_bytes": "9", "answer_bytes": "10"}


def test_completion_from_json_bounds_choices_too() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "x"}}] * (MAX_CHOICES + 1)}
    with pytest.raises(UpstreamBadResponse):
        completion_from_json(body, provider="p")


def test_many_small_pieces_are_kept_compactly() -> None:
    # A str per token costs ~50 bytes of object header besides its text: 200,000 three-character
    # pieces held ~12 MB for 600 KB of text (a 50 MB answer took RSS to 2.6 GiB).
    accumulator = StreamAccumulator(provider="p")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200_000):
            accumulator.add(_chunk({"content": f"{n % 10}ab"}))  # a new str each, freed with its chunk
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2_000_000, held
    content = accumulator.completion()["choices"][0]["message"]["content"]
    assert content == "".join(f"{n % 10}ab" for n in range(200_000))


def test_the_answer_cap_is_a_setting_and_a_flag() -> None:
    assert load_settings(environ={}).max_answer_bytes == DEFAULT_MAX_ANSWER_BYTES == 32 * 1024 * 1024
    assert load_settings(environ={"LLMGW_MAX_ANSWER_BYTES": "1000"}).max_answer_bytes == 1000
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-answer-bytes", "2000"])
    assert load_settings(args, environ={"LLMGW_MAX_ANSWER_BYTES": "1000"}).max_answer_bytes == 2000
    # The final gRPC message must fit the server's 64 MiB send limit.
    for bad in ("0", str(64 * 1024 * 1024)):
        with pytest.raises(ValueError, match="LLMGW_MAX_ANSWER_BYTES"):
            load_settings(environ={"LLMGW_MAX_ANSWER_BYTES": bad})
