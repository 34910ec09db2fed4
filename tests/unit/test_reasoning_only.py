"""An answer of only reasoning that says it is complete (server.core.reasoning_only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from server.core import reasoning_only
from server.errors import UpstreamBadResponse
from server.traces.base import TraceRecord

THOUGHT = "The user wants a haiku. Let me count syllables first."


def choice(finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}


@pytest.mark.parametrize(
    "message",
    [
        {"content": None, "reasoning_content": THOUGHT},  # DeepSeek-reasoner
        {"content": "", "reasoning_content": THOUGHT},
        {"content": "\n\n", "reasoning_content": THOUGHT},  # blanks after the thinking
        {"content": None, "reasoning": THOUGHT},  # vLLM, OpenRouter
        {"content": [{"type": "text", "text": " "}], "reasoning": THOUGHT},  # content parts
        {"content": None, "reasoning_content": "  ", "reasoning": THOUGHT},  # the one with text
        {"content": None, "reasoning_content": THOUGHT, "tool_calls": [], "refusal": None},
        {"content": None, "reasoning_content": THOUGHT, "refusal": " "},
    ],
)
def test_only_reasoning_with_stop_is_reasoning_only(message: dict[str, Any]) -> None:
    assert reasoning_only.reasoning_only(choice(**message)) == THOUGHT


@pytest.mark.parametrize("finish", ["eos", "end_turn", "stop_sequence"])
def test_other_spellings_of_stop_are_reasoning_only_too(finish: str) -> None:
    # Some OpenAI-compatible servers' words for a complete answer: the caller gets
    # FINISH_REASON_STOP for them (server.core.completion), so empty content would say complete.
    assert reasoning_only.reasoning_only(choice(finish, content=None, reasoning=THOUGHT)) == THOUGHT
    with pytest.raises(UpstreamBadResponse) as raised:
        reasoning_only.check(answer(choice(finish, content="", reasoning_content=THOUGHT)), provider="openai")
    assert raised.value.metadata["finish_reason"] == finish
    assert f"finish_reason {finish}" in raised.value.message


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("finish", "message"),
    [
        ("stop", {"content": "A haiku.", "reasoning_content": THOUGHT}),  # reasoning plus content
        ("stop", {"content": [{"type": "text", "text": "A haiku."}], "reasoning": THOUGHT}),
        ("stop", {"content": None, "reasoning_content": THOUGHT, "tool_calls": [CALL]}),
        ("tool_calls", {"content": None, "reasoning_content": THOUGHT, "tool_calls": [CALL]}),
        ("stop", {"content": None, "reasoning": THOUGHT, "function_call": CALL["function"]}),
        ("stop", {"content": None, "reasoning_content": THOUGHT, "refusal": "I can't help with that."}),
        ("length", {"content": None, "reasoning_content": THOUGHT}),  # cut while thinking: OK/LENGTH
        ("content_filter", {"content": None, "reasoning_content": THOUGHT}),
        ("stop", {"content": None, "reasoning_content": " \n"}),  # no reasoning: not this error
        ("stop", {"content": None}),
        ("stop", {"content": "Hi."}),
    ],
)
def test_anything_else_is_not_reasoning_only(finish: str, message: dict[str, Any]) -> None:
    assert reasoning_only.reasoning_only(choice(finish, **message)) is None


@pytest.mark.parametrize(
    "shape", [None, "x", {"finish_reason": "stop"}, {"finish_reason": "stop", "message": 3}]
)
def test_shapes_without_a_message_are_not_reasoning_only(shape: object) -> None:
    assert reasoning_only.reasoning_only(shape) is None


def answer(*choices: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": 21, "completion_tokens": 480, "total_tokens": 501}
    return {"id": "x", "object": "chat.completion", "choices": list(choices), "usage": usage}


def test_enforce_raises_with_the_cause_and_keeps_the_usage() -> None:
    record = TraceRecord(id="t", created_at=datetime.now(UTC))
    ok = choice(content="Fine.")
    bad = {**choice(content=None, reasoning_content=THOUGHT), "index": 1}
    with pytest.raises(UpstreamBadResponse) as raised:
        reasoning_only.enforce(answer(ok, bad), record, provider="deepseek")
    error = raised.value
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert error.metadata == {
        "provider": "deepseek",
        "cause": "reasoning_only",
        "reasoning_chars": str(len(THOUGHT)),
        "finish_reason": "stop",
        "choice": "1",
    }
    assert THOUGHT not in error.message  # the reasoning is in the trace, not in the caller's error
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (21, 480, 501)


def test_enforce_passes_an_answer_and_leaves_the_trace_alone() -> None:
    record = TraceRecord(id="t", created_at=datetime.now(UTC))
    reasoning_only.enforce(answer(choice(content="Fine.", reasoning_content=THOUGHT)), record, provider="x")
    assert record.total_tokens == 0  # a success's usage is recorded from the completion, later
