"""Review of issue 12 item 6 (server/core/offload.py, the counting paths in server/core/tokens.py)."""

from __future__ import annotations

from typing import Any

import pytest

from server.core import tokens
from server.core.validation import MAX_FUNCTIONS


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    tokens.clear_memo()


def _function(n: int, properties: int = 3) -> dict[str, Any]:
    return {
        "name": f"tool_{n}",
        "description": f"tool number {n}",
        "parameters": {
            "type": "object",
            "properties": {
                f"p{p}": {"type": "string", "enum": [f"v{n}_{p}_{o}" for o in range(5)]}
                for p in range(properties)
            },
        },
    }


def _spy_functions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    walked: list[int] = []
    original = tokens._one_function_tokens

    def spy(entry: Any, count: Any) -> int:
        walked.append(1)
        return original(entry, count)

    monkeypatch.setattr(tokens, "_one_function_tokens", spy)
    return walked


# -- the per-function memo -------------------------------------------------------------------------


def test_a_tool_set_of_max_functions_is_remembered_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old memo held 512 entries and was cleared when full: an agent with more tools than that
    # walked (and looked up every string of) its whole tool set again on every step.
    functions = [_function(n) for n in range(MAX_FUNCTIONS)]
    encoding, _ = tokens.encoding_for_model("gpt-4o")
    first = tokens.count_function_tokens(functions, encoding)
    walked = _spy_functions(monkeypatch)
    assert tokens.count_function_tokens(functions, encoding) == first
    assert walked == []


def test_the_function_memo_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_FUNCTION_TOKENS_BUDGET_BYTES", 50_000)
    functions = [_function(n, properties=20) for n in range(60)]  # ~2.5 KB of JSON each
    encoding, _ = tokens.encoding_for_model("gpt-4o")
    expected = tokens.count_function_tokens(functions, encoding)
    assert tokens._FUNCTION_TOKENS_HELD <= 50_000
    held = sum(tokens._function_weight(entry, n) for entry, n in tokens._FUNCTION_TOKENS.values())
    assert held <= 50_000
    assert 0 < len(tokens._FUNCTION_TOKENS) < 60
    assert tokens.count_function_tokens(functions, encoding) == expected  # forgetting is only slower


# -- the inline budget is per request, not per string ----------------------------------------------


def test_many_medium_messages_share_one_inline_budget() -> None:
    # 250 messages of 30,000 new characters each (7.5 M, inside MAX_REQUEST_CHARS): each is under
    # INLINE_CHARS, but the budget is the request's, so all but the first go to the pool.
    messages = [{"role": "user", "content": chr(0x4E00 + n) * 30_000} for n in range(250)]
    started = tokens.start_request_count(messages, None, "gpt-4o")
    assert isinstance(started, tokens.PendingCount)
    assert len(started.prompt_left) == 249
