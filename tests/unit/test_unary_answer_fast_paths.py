"""The unary answer path's shortcuts give exactly what the code before them gave.

Each one (`tool_call_check.expected` returning NOTHING and asking the server's kind only for an
answer with several calls in a choice, ...) is compared, on many random requests and answers,
with a reference: the code as it was before it (copied below).
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server.core import tool_call_check, tools, upstream_kind
from server.core.tool_call_check import NOTHING, Expected
from server.errors import GatewayError

# -- references: the code before the shortcuts ---------------------------------------------


def reference_expected(
    request: chat_pb2.CreateRequest, body: dict[str, Any] | None = None, *, endpoint: str = ""
) -> Expected:
    if not request.functions:
        return NOTHING
    forced = request.force_tool_call or (
        request.function_call if request.function_call not in tool_call_check._NAMED_CHOICES else ""
    )
    if body is None:
        return Expected(required=True, forced=forced, at_most_one=True)
    choice = body.get("tool_choice")
    legacy = body.get("function_call")
    if isinstance(legacy, dict):
        forced = forced or str(legacy.get("name") or "")
    required = bool(forced) or choice == "required"
    config = request.llm_config
    ignores_flag = not tools.takes_named_tool_choice(
        handle=config.handle, model=config.model, endpoint=endpoint
    )
    at_most_one = ignores_flag and body.get("parallel_tool_calls") is False
    return Expected(required=required, forced=forced, at_most_one=at_most_one)


def _outcome(f: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", f(*args, **kwargs)
    except GatewayError as exc:
        return "error", (type(exc), str(exc), getattr(exc, "metadata", None))
    except Exception as exc:  # noqa: BLE001 - the general code's own crash must be the same too
        return "crash", type(exc)


# -- tool_call_check.expected ---------------------------------------------------------------

LLAMA_URL = "http://llama.test:8080/v1"
OTHER_URL = "http://vllm.test:8000/v1"


def _call(name: str) -> dict[str, Any]:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": "{}"}}


def _answers() -> Iterator[dict[str, Any]]:
    messages: list[Any] = [
        {"role": "assistant", "content": "text"},
        {"role": "assistant", "content": None, "tool_calls": [_call("f")]},
        {"role": "assistant", "content": None, "tool_calls": [_call("f"), _call("g")]},
        {"role": "assistant", "content": None, "tool_calls": [_call("g"), _call("f"), _call("f")]},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        "not a message",
    ]
    for finish in ("stop", "tool_calls", "length"):
        for message in messages:
            yield {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
        # Several choices: a later one with several calls must still be cut.
        for first, second in itertools.product(messages[:4], repeat=2):
            yield {
                "choices": [
                    {"index": 0, "message": first, "finish_reason": finish},
                    {"index": 1, "message": second, "finish_reason": finish},
                ]
            }
    yield {"choices": "x"}
    yield {"choices": ["x", {"message": messages[2]}]}
    yield {}


def _requests_and_bodies() -> Iterator[tuple[chat_pb2.CreateRequest, dict[str, Any], str]]:
    for functions, function_call, force, handle in itertools.product(
        (0, 1, 2), ("", "auto", "none", "required", "f", "g"), ("", "f"), ("openai/m", "llamacpp/qwen")
    ):
        request = chat_pb2.CreateRequest(
            llm_config=chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", handle=handle),
            function_call=function_call,
            force_tool_call=force,
        )
        for name in ("f", "g")[:functions]:
            request.functions.add(name=name)
        for tool_choice, legacy, parallel, endpoint in itertools.product(
            ("auto", "required", {"type": "function", "function": {"name": "f"}}, None),
            (None, {"name": "g"}, "auto"),
            (False, True, None),
            (LLAMA_URL, OTHER_URL),
        ):
            body: dict[str, Any] = {"model": "m"}
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
            if legacy is not None:
                body["function_call"] = legacy
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
            yield request, body, endpoint


@pytest.fixture
def llama_learned() -> Iterator[None]:
    upstream_kind.forget_all()
    upstream_kind.learn(LLAMA_URL, {"server": "llama.cpp"})
    yield
    upstream_kind.forget_all()


@pytest.mark.usefixtures("llama_learned")
def test_expected_is_the_same_value_as_before() -> None:
    for request, body, endpoint in _requests_and_bodies():
        assert tool_call_check.expected(request, body, endpoint=endpoint) == reference_expected(
            request, body, endpoint=endpoint
        ), (request, body, endpoint)
        assert tool_call_check.expected(request, None, endpoint=endpoint) == reference_expected(
            request, None, endpoint=endpoint
        )


@pytest.mark.usefixtures("llama_learned")
def test_a_unary_answer_is_checked_as_before() -> None:
    """`expected(..., answer=)` then `check`: the same calls cut, the same error, the same
    answer after, as with the expectation of before (which always asked the server's kind)."""
    cut = 0
    pairs = list(itertools.product(list(_requests_and_bodies()), list(_answers())))
    for (request, body, endpoint), answer in random.Random(0).sample(pairs, 20_000):
        ours, theirs = copy.deepcopy(answer), copy.deepcopy(answer)
        want = tool_call_check.expected(request, body, endpoint=endpoint, answer=ours)
        reference = reference_expected(request, body, endpoint=endpoint)
        outcome = _outcome(tool_call_check.check, ours, want, provider="p")
        assert outcome == _outcome(tool_call_check.check, theirs, reference, provider="p"), (
            request,
            body,
            endpoint,
            answer,
        )
        assert ours == theirs
        cut += outcome[0] == "ok" and bool(outcome[1])
    assert cut  # the llama.cpp cases with several calls were among them


def test_nothing_to_check_is_nothing() -> None:
    request = chat_pb2.CreateRequest(function_call="auto")
    request.functions.add(name="f")
    body = {"tool_choice": "auto", "parallel_tool_calls": False}
    assert tool_call_check.expected(request, body, endpoint=OTHER_URL) is NOTHING
    answer = {"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}
    assert tool_call_check.expected(request, body, endpoint=OTHER_URL, answer=answer) is NOTHING
    # A required call is still required.
    body["tool_choice"] = "required"
    assert tool_call_check.expected(request, body, endpoint=OTHER_URL, answer=answer) == Expected(
        required=True
    )


@pytest.mark.usefixtures("llama_learned")
def test_the_server_kind_is_asked_only_for_several_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def takes_named_tool_choice(*, handle: str, model: str, endpoint: str = "") -> bool:
        asked.append(endpoint)
        return False

    monkeypatch.setattr(tools, "takes_named_tool_choice", takes_named_tool_choice)
    request = chat_pb2.CreateRequest(function_call="auto")
    request.functions.add(name="f")
    body = {"tool_choice": "auto", "parallel_tool_calls": False}
    one = {"choices": [{"message": {"tool_calls": [_call("f")]}, "finish_reason": "tool_calls"}]}
    assert tool_call_check.expected(request, body, endpoint=LLAMA_URL, answer=one) is NOTHING
    assert asked == []
    two = {"choices": [{"message": {"tool_calls": [_call("f"), _call("f")]}, "finish_reason": "tool_calls"}]}
    assert tool_call_check.expected(request, body, endpoint=LLAMA_URL, answer=two) == Expected(
        at_most_one=True
    )
    assert asked == [LLAMA_URL]
    # A stream's expectation (no answer yet) asks, as before.
    assert tool_call_check.expected(request, body, endpoint=LLAMA_URL).at_most_one
    assert asked == [LLAMA_URL, LLAMA_URL]
