"""The unary answer path's shortcuts give exactly what the code before them gave.

Each one (`tool_call_check.expected` returning NOTHING and asking the server's kind only for an
answer with several calls in a choice; `check_shape`'s one-message answer and inline usage
counts; `completion_from_json` writing no empty value and calling int() only on a count that is
not one; `reasoning_only` looking at the reasoning first) is compared, on many random requests
and answers, with a reference: the code as it was before it (copied below). The answer cap's
shortcut (no walk for a body within the cap) is a bound, tested as one.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.config import Settings
from server.core import reasoning_only, tool_call_check, tools, upstream_kind
from server.core.completion import (
    _EMPTY,
    MAX_CHOICES,
    MAX_LABEL_CHARS,
    _signature,
    answer_bytes,
    completion_from_json,
    finish_reason,
    text_of,
    too_many,
)
from server.core.messages import thinking_block_into
from server.core.tool_call_check import NOTHING, Expected
from server.errors import GatewayError, UpstreamBadResponse
from server.providers.openai_compat import (
    _INT32_MAX,
    _INT64_MAX,
    OPENAI,
    _bad_shape,
    _check_message,
    _is_int,
    answer_is_body_json,
    check_shape,
)
from server.providers.registry import PROVIDERS, provider_for

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


def reference_check_usage(usage: object, provider: str) -> None:
    if usage is None:
        return
    if not isinstance(usage, dict):
        raise _bad_shape(provider, "usage")
    # (With the rules added since for the counts that reached the Usage fields unchecked.)
    for key in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_cache_hit_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
    ):
        if not _is_int(usage.get(key), _INT32_MAX):
            raise _bad_shape(provider, f"usage.{key}")
    if (
        not usage.get("total_tokens")
        and (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0) > _INT32_MAX
    ):
        raise _bad_shape(provider, "usage.total_tokens")
    for details, key in (
        ("prompt_tokens_details", "cached_tokens"),
        ("completion_tokens_details", "reasoning_tokens"),
    ):
        value = usage.get(details)
        if value is None:
            continue
        if not isinstance(value, dict) or not _is_int(value.get(key), _INT32_MAX):
            raise _bad_shape(provider, f"usage.{details}")


def reference_check_shape(payload: dict[str, Any], *, provider: str) -> None:
    """`check_shape` without its fast paths (the chunk's and the unary answer's)."""
    choices = payload.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise _bad_shape(provider, "choices")
        if len(choices) > MAX_CHOICES:
            raise too_many(provider, "choices", len(choices), MAX_CHOICES)
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _bad_shape(provider, f"choices[{i}]")
            get = choice.get
            index = get("index")
            if index is not None and not _is_int(index, MAX_CHOICES - 1):
                raise _bad_shape(provider, f"choices[{i}].index")
            finish, text = get("finish_reason"), get("text")
            if (finish is not None and not isinstance(finish, str)) or (
                text is not None and not isinstance(text, str)
            ):
                raise _bad_shape(provider, f"choices[{i}]")
            message = get("message")
            if message is not None:
                _check_message(message, provider, f"choices[{i}].message")
            delta = get("delta")
            if delta is not None:
                _check_message(delta, provider, f"choices[{i}].delta")
    created = payload.get("created")
    if (
        created is not None
        and not _is_int(created, _INT64_MAX)
        and not (isinstance(created, float) and 0 <= created <= 2**62)
    ):
        raise _bad_shape(provider, "created")
    usage = payload.get("usage")
    if usage is not None:
        reference_check_usage(usage, provider)


def reference_usage_from_json(
    usage: dict[str, Any] | None, into: chat_pb2.Usage | None = None
) -> chat_pb2.Usage:
    out = into if into is not None else chat_pb2.Usage()
    if not usage:
        return out
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    out.prompt_tokens = prompt
    out.completion_tokens = completion
    out.total_tokens = int(usage.get("total_tokens") or prompt + completion)
    out.cached_tokens = int(prompt_details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0)
    out.reasoning_tokens = int(completion_details.get("reasoning_tokens") or 0)
    out.cache_write_tokens = int(usage.get("cache_write_tokens") or 0)
    one_hour = usage.get("cache_write_1h_tokens")
    if isinstance(one_hour, int) and 0 < one_hour <= out.cache_write_tokens:
        out.cache_write_1h_tokens = one_hour
    return out


def reference_fill_message(out: chat_pb2.Message, message: dict[str, Any]) -> None:
    out.role = chat_pb2.ROLE_ASSISTANT
    calls = out.tool_calls
    for call in message.get("tool_calls") or ():
        function = call.get("function") or _EMPTY
        calls.add(
            id=call.get("id") or "",
            name=function.get("name") or "",
            arguments=function.get("arguments") or "",
            thought_signature=_signature(call.get("thought_signature")),
        )
    legacy = message.get("function_call")
    if legacy and not calls:
        calls.add(name=legacy.get("name") or "", arguments=legacy.get("arguments") or "")
    content = text_of(message.get("content"))
    if content:
        out.content = content
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        out.reasoning_content = reasoning
    refusal = message.get("refusal")
    if refusal:
        out.refusal = refusal
    for block in message.get("thinking_blocks") or ():
        if isinstance(block, dict):
            thinking_block_into(out.thinking_blocks.add(), block)


def reference_completion_from_json(
    body: dict[str, Any], *, provider: str, into: chat_pb2.ChatCompletion | None = None
) -> chat_pb2.ChatCompletion:
    choices_json = body.get("choices")
    if not isinstance(choices_json, list) or not choices_json:
        raise UpstreamBadResponse(f"{provider} answered without choices", metadata={"provider": provider})
    if len(choices_json) > MAX_CHOICES:
        raise too_many(provider, "choices", len(choices_json), MAX_CHOICES)
    for position, choice in enumerate(choices_json):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise UpstreamBadResponse(
                f"{provider} answered a choice without a message",
                metadata={"provider": provider, "choice": position},
            )
    for key in ("id", "model", "system_fingerprint"):
        label = body.get(key)
        if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
            raise UpstreamBadResponse(
                f"{provider} answered a {key} over {MAX_LABEL_CHARS} characters",
                metadata={"provider": provider, "field": key, "limit": MAX_LABEL_CHARS},
            )
    out = into if into is not None else chat_pb2.ChatCompletion()
    out.id = str(body.get("id") or "")
    out.model = str(body.get("model") or "")
    out.created = int(body.get("created") or 0)
    out.system_fingerprint = str(body.get("system_fingerprint") or "")
    choices = out.choices
    for position, choice in enumerate(choices_json):
        added = choices.add()
        added.index = int(choice.get("index") or position)
        reference_fill_message(added.message, choice["message"])
        added.finish_reason = finish_reason(choice.get("finish_reason"))
    out.usage.SetInParent()
    reference_usage_from_json(body.get("usage"), out.usage)
    return out


def reference_reasoning_only(choice: object) -> str | None:
    if (
        not isinstance(choice, dict)
        or finish_reason(choice.get("finish_reason")) != chat_pb2.FINISH_REASON_STOP
    ):
        return None
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    reasoning = next(
        (
            text
            for key in ("reasoning_content", "reasoning")
            if isinstance(text := message.get(key), str) and text.strip()
        ),
        None,
    )
    if reasoning is None:
        return None
    if text_of(message.get("content")).strip() or message.get("tool_calls") or message.get("function_call"):
        return None
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal.strip():
        return None
    return reasoning


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


# -- random unary answers -----------------------------------------------------------------


class Count(int):
    """An int of another type (a translator's own value): not the inline test's, `_is_int`'s."""


def _maybe(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


def _text(rng: random.Random) -> str:
    pieces = ["tok ", "é", "日本", "\n", "😀", '"', "\\", "sk-", " ", ""]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))


def _count(rng: random.Random) -> Any:
    return rng.choice(
        [0, 3, 212, _INT32_MAX, _INT32_MAX + 1, -1, True, False, 2.0, "4", None, Count(5), Count(-1)]
    )


def _usage(rng: random.Random) -> Any:
    if _maybe(rng, 0.05):
        return rng.choice([None, 3, "x", [], {}])
    usage: dict[str, Any] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if _maybe(rng, 0.9):
            usage[key] = rng.choice([7, 12, 212]) if _maybe(rng, 0.85) else _count(rng)
    if _maybe(rng, 0.2):
        usage["prompt_cache_hit_tokens"] = _count(rng) if _maybe(rng, 0.3) else 4
    for details, key in (
        ("prompt_tokens_details", "cached_tokens"),
        ("completion_tokens_details", "reasoning_tokens"),
    ):
        if _maybe(rng, 0.6):
            usage[details] = (
                {key: rng.choice([0, 2]) if _maybe(rng, 0.8) else _count(rng)}
                if _maybe(rng, 0.9)
                else rng.choice([None, {}, 3, "x", {"other": 1}])
            )
    if _maybe(rng, 0.2):
        usage["cache_write_tokens"] = rng.choice([0, 5, 9, 2.0, True, None])
    if _maybe(rng, 0.1):
        usage["cache_write_1h_tokens"] = rng.choice([0, 3, 9, 10, -1, True, 2.0, None])
    if _maybe(rng, 0.1):
        usage["cost"] = 0.0001  # an unknown field (OpenRouter's)
    return usage


def _tool_calls(rng: random.Random) -> Any:
    if _maybe(rng, 0.1):
        return rng.choice([None, [], "x", {}])
    calls: list[Any] = []
    for i in range(rng.randint(1, 3)):
        call: dict[str, Any] = {"id": f"call_{i}", "type": "function"}
        call["function"] = {"name": rng.choice(["f", "g", _text(rng)]), "arguments": _text(rng) or "{}"}
        if _maybe(rng, 0.1):
            call["function"] = rng.choice([None, "x", {"name": 3}, {"arguments": ["a"]}, {}])
        if _maybe(rng, 0.1):
            call["id"] = rng.choice([None, 3, ""])
        if _maybe(rng, 0.1):
            call["index"] = rng.choice([0, 1, 127, 128, -1, True, None])
        if _maybe(rng, 0.1):
            call["thought_signature"] = rng.choice(["sig", 3, None])
        if _maybe(rng, 0.03):
            call = rng.choice(["x", 3])  # type: ignore[assignment]
        calls.append(call)
    return calls


def _message(rng: random.Random) -> Any:
    if _maybe(rng, 0.03):
        return rng.choice([None, "x", 3, []])
    message: dict[str, Any] = {"role": "assistant"}
    if _maybe(rng, 0.05):
        message["role"] = rng.choice([None, 1])
    if _maybe(rng, 0.9):
        message["content"] = (
            _text(rng)
            if _maybe(rng, 0.8)
            else rng.choice(
                [None, "", [{"type": "text", "text": _text(rng)}, {"type": "x"}], [], 5, [{"text": 3}], ["x"]]
            )
        )
    if _maybe(rng, 0.5):
        message["refusal"] = None if _maybe(rng, 0.8) else rng.choice([_text(rng), "", 1.5])
    if _maybe(rng, 0.25):
        message[rng.choice(["reasoning_content", "reasoning"])] = (
            _text(rng) if _maybe(rng, 0.8) else rng.choice(["", None, " ", 7])
        )
    if _maybe(rng, 0.05):
        message["reasoning_content"], message["reasoning"] = _text(rng), _text(rng)
    if _maybe(rng, 0.25):
        message["tool_calls"] = _tool_calls(rng)
    if _maybe(rng, 0.05):
        message["function_call"] = rng.choice(
            [{"name": "f", "arguments": _text(rng)}, {"name": 3}, "x", None, {}]
        )
    if _maybe(rng, 0.1):
        message["thinking_blocks"] = rng.choice(
            [
                [{"type": "thinking", "thinking": _text(rng), "signature": "sig"}],
                [{"type": "redacted_thinking", "data": "opaque"}, "x", {"type": 3, "thinking": 4}],
                None,
                [],
            ]
        )
    if _maybe(rng, 0.1):
        message["x_unknown"] = _text(rng)
    return message


def _choice(rng: random.Random, position: int) -> Any:
    choice: dict[str, Any] = {"message": _message(rng), "logprobs": None}
    if _maybe(rng, 0.95):
        choice["index"] = position if _maybe(rng, 0.9) else rng.choice([0, 1, 15, 16, None, True, -1, 1.0])
    choice["finish_reason"] = rng.choice(
        ["stop", "stop", "stop", "length", "tool_calls", "eos", "end_turn", "weird", "", None, 3]
    )
    if _maybe(rng, 0.05):
        choice["delta"] = rng.choice([{"content": "x"}, {"content": 3}, None, "x", {}])
    if _maybe(rng, 0.05):
        choice["text"] = rng.choice(["x", 1, None])
    if _maybe(rng, 0.05):
        del choice["message"]
    if _maybe(rng, 0.02):
        return rng.choice(["x", 1, None])
    return choice


def _answer(rng: random.Random) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "chatcmpl-1" if _maybe(rng, 0.9) else rng.choice(["", None, 3, "i" * 1025, "i" * 1024]),
        "object": "chat.completion",
        "created": rng.choice([1760000000, 1760000000, 1.5e9, 0, None, -1, True, "x", 2**63]),
        "model": "m" if _maybe(rng, 0.9) else rng.choice(["", None, "m" * 1025, "/models/q.gguf"]),
        "system_fingerprint": "fp" if _maybe(rng, 0.8) else rng.choice(["", None, 3, "f" * 1025]),
    }
    if _maybe(rng, 0.05):
        answer["choices"] = rng.choice([[], None, "x", {}])
    else:
        count = 1 if _maybe(rng, 0.85) else rng.choice([0, 2, 3, 17])
        answer["choices"] = [_choice(rng, i) for i in range(count)]
    if _maybe(rng, 0.9):
        answer["usage"] = _usage(rng)
    return answer


@pytest.mark.parametrize("seed", range(4))
def test_check_shape_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3000):
        answer = _answer(rng)
        assert _outcome(check_shape, answer, provider="p") == _outcome(
            reference_check_shape, answer, provider="p"
        ), answer


def test_check_shape_usage_counts_at_their_bounds() -> None:
    values: list[Any] = [
        None,
        0,
        1,
        _INT32_MAX,
        _INT32_MAX + 1,
        -1,
        True,
        False,
        1.0,
        "1",
        Count(3),
        Count(-1),
    ]
    for value, key in itertools.product(
        values, ("prompt_tokens", "prompt_cache_hit_tokens", "cached_tokens")
    ):
        usage = {key: value} if key != "cached_tokens" else {"prompt_tokens_details": {key: value}}
        answer = {"choices": [{"message": {"content": "x"}}], "usage": usage}
        outcome = _outcome(check_shape, answer, provider="p")
        assert outcome == _outcome(reference_check_shape, answer, provider="p"), value
        assert (outcome[0] == "ok") == _is_int(value, _INT32_MAX), value


# -- the answer cap without a walk: a body's size bounds what the cap counts ---------------


def test_which_dialects_answer_their_body_as_decoded() -> None:
    decoded = {name for name, dialect in PROVIDERS.items() if answer_is_body_json(dialect)}
    assert decoded == {"openai", "groq", "deepseek", "azure"}
    assert answer_is_body_json(provider_for("azure", Settings(azure_api_version="2024-10-21")))
    assert answer_is_body_json(OPENAI)

    class Rewritten(type(OPENAI)):  # type: ignore[misc]
        def parse_answer(self, raw: bytes, **kwargs: Any) -> dict[str, Any]:
            return {}

    assert not answer_is_body_json(Rewritten())


def _dumps(rng: random.Random, answer: dict[str, Any]) -> bytes:
    # The body as servers write it: compact UTF-8, escaped ASCII, indented, \/ escapes.
    import json

    way = rng.randrange(4)
    if way == 0:
        return orjson.dumps(answer)
    if way == 1:
        return json.dumps(answer).encode()
    if way == 2:
        return json.dumps(answer, ensure_ascii=False, indent=2).encode()
    return json.dumps(answer, separators=(",", ":")).replace("/", "\\/").encode()


@pytest.mark.parametrize("seed", range(4))
def test_an_answer_counts_fewer_bytes_than_its_body(seed: int) -> None:
    rng = random.Random(seed)
    checked = 0
    for _ in range(3000):
        answer = _answer(rng)
        try:
            raw = _dumps(rng, answer)
        except (TypeError, ValueError, orjson.JSONEncodeError):
            continue  # not JSON (a bool key, an int too big for orjson)
        decoded = orjson.loads(raw)
        if _outcome(check_shape, decoded, provider="p")[0] != "ok":
            continue
        assert answer_bytes(decoded) < len(raw), raw
        checked += 1
    assert checked > 500


def test_the_closest_a_text_comes_to_its_body() -> None:
    # Only the JSON around a text is over what it counts: the text itself, as it is or
    # escaped, is never shorter in the body than in UTF-8.
    envelope = b'{"choices":[{"message":{"content":""}}]}'
    for text, counted in (
        (b"x" * 100, 100),
        ("é日😀".encode() * 10, (2 + 3 + 4) * 10),  # as they are: the same bytes
        (b"\\u00e9" * 10, 2 * 10),  # each 6 bytes for 2
        (b"\\ud83d\\ude00" * 10, 4 * 10),  # each pair 12 bytes for 4
        (b'\\n\\/\\\\\\"' * 10, 4 * 10),  # each 2 bytes for 1
    ):
        raw = envelope[:-5] + text + envelope[-5:]
        assert answer_bytes(orjson.loads(raw)) == counted <= len(text) < len(raw)


# -- completion_from_json --------------------------------------------------------------------


def _wire(f: Any, answer: dict[str, Any], into: bool) -> tuple[str, Any]:
    """The outcome of converting `answer`, a completion as its wire bytes (into a response's
    field, as the gateway does, or a message of its own)."""

    def convert() -> bytes:
        response = chat_pb2.CreateResponse(provider_trace_id="t")
        out = f(copy.deepcopy(answer), provider="p", into=response.completion if into else None)
        assert (out is response.completion) == into
        return (
            response.SerializeToString(deterministic=True)
            if into
            else out.SerializeToString(deterministic=True)
        )

    return _outcome(convert)


@pytest.mark.parametrize("seed", range(4))
def test_completion_from_json_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    compared = 0
    for i in range(3000):
        answer = _answer(rng)
        ours, theirs = (
            _wire(completion_from_json, answer, i % 2 == 0),
            _wire(reference_completion_from_json, answer, i % 2 == 0),
        )
        if _outcome(check_shape, answer, provider="p")[0] == "ok":
            # What reaches it on every path: shape-checked. (Both crash alike on a total over
            # int32 made of the two counts when the answer's own total is 0: left as it was.)
            assert ours == theirs, answer
            compared += ours[0] == "ok"
        else:
            # Refused before on every path; the two may crash in another order on such values.
            assert ours[0] == theirs[0] and (ours[0] == "crash" or ours == theirs), answer
    assert compared > 300


def test_completion_from_json_writes_the_values_it_left_out_when_not_empty() -> None:
    # The values it does not write are the empty ones: zeros and empty strings everywhere.
    answer = {
        "id": "",
        "model": None,
        "created": 0,
        "choices": [{"index": 0, "message": {"content": ""}, "finish_reason": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    completion = completion_from_json(answer, provider="p")
    assert completion == reference_completion_from_json(answer, provider="p")
    assert completion.HasField("usage") and completion.choices[0].HasField("message")
    answer["choices"][0]["index"] = 3  # a position's own index when it says none
    answer["choices"].append({"message": {"content": "b"}})
    assert completion_from_json(answer, provider="p").choices[1].index == 1


# -- reasoning_only ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_reasoning_only_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    found = 0
    for _ in range(3000):
        answer = _answer(rng)
        choices = answer.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            ours = _outcome(reasoning_only.reasoning_only, choice)
            assert ours == _outcome(reference_reasoning_only, choice), choice
            found += ours[0] == "ok" and ours[1] is not None
        if _outcome(check_shape, answer, provider="p")[0] == "ok":
            assert _outcome(reasoning_only.check, answer, provider="p")[0] in ("ok", "error")
    assert found > 20


@pytest.mark.parametrize(
    "message",
    [
        {"reasoning_content": " ", "reasoning": "thought", "content": " "},
        {"reasoning_content": 3, "reasoning": "thought"},
        {"reasoning_content": "thought", "reasoning": "other", "refusal": " "},
        {"reasoning": "thought", "content": [{"text": " "}]},
    ],
)
def test_the_reasoning_of_either_key_counts(message: dict[str, Any]) -> None:
    for finish in ("stop", "eos", "length"):
        choice = {"message": message, "finish_reason": finish}
        assert reasoning_only.reasoning_only(choice) == reference_reasoning_only(choice)
        assert (reasoning_only.reasoning_only(choice) is not None) == (finish != "length")
