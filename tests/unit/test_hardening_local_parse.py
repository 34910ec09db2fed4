"""Issue 12, item 6's class: reading a local model's broken output costs time linear in its size.

Each `{` is a candidate start of the call; the old reader re-read the rest of the text from every
one of up to 64 candidates, in pure Python, so 100,000 characters of a broken answer cost ~6 s
(~14 s with a primed prefix). The bound asserted below (2 s for 150,000 characters, which took
~20 s before, ~0.6 s now) is a generous responsiveness bound, not a benchmark.
"""

from __future__ import annotations

import time

import pytest

from server.errors import UnparseableModelOutput
from server.providers.local.parsing import parse_function_call

PRIMED = '{"function": "send_message", "params": {"message": '


def nested_then_broken(chars: int) -> str:
    """60 nested objects (60 candidates), a long array, then a character no repair accepts."""
    return '{"a":' * 60 + "[" + "1," * (chars // 2) + " x"


@pytest.mark.parametrize("primed_prefix", ["", PRIMED])
def test_a_broken_answer_with_many_candidates_is_refused_in_linear_time(primed_prefix: str) -> None:
    text = nested_then_broken(150_000)
    started = time.monotonic()
    with pytest.raises(UnparseableModelOutput) as caught:
        parse_function_call(text, primed_prefix=primed_prefix)
    assert time.monotonic() - started < 2.0
    assert caught.value.metadata["raw_output"] == text[:500]


def test_the_call_after_failed_candidates_is_still_found() -> None:
    # Chatter with braces, a broken object, then the call: later candidates still get their turn.
    text = (
        'I think {this} is {the answer} and {"draft": [1, 2 x\n'
        + 'so: {"function": "send_message", "params": {"message": "hi"}}'
    )
    call = parse_function_call(text)
    assert call.name == "send_message"
    assert call.arguments == {"message": "hi"}


def test_a_long_valid_call_after_a_long_broken_draft_is_found() -> None:
    draft = '{"draft": [' + "1, " * 50_000 + "x"
    text = draft + '\n{"function": "send_message", "params": {"message": "done"}}'
    call = parse_function_call(text)
    assert call.arguments == {"message": "done"}
