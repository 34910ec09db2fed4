# ruff: noqa: E501 - the servers' error messages are quoted whole
"""Issue 14's fixes that fakes can prove: overflow shapes, tool-call checks, error bodies, names."""

from __future__ import annotations

import json

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.core import tool_call_check
from server.core.openai_request import build_chat_body, unpack_completion
from server.errors import ContextWindowExceeded, ToolCallMissing, UpstreamRejected
from server.providers.errors import error_for_status, keep_error_body
from server.traces.base import TraceRecord

SECRET = "sk-test-0123456789abcdefghijklmnop"


def scrub(text: str) -> str:
    return text.replace(SECRET, "[REDACTED]")


OVERFLOWS = {
    # llama.cpp's llama-server, as it answered the real server in tests/real
    "llamacpp": (
        {
            "error": {
                "code": 400,
                "message": "request (6023 tokens) exceeds the available context size (4096 tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 6023,
                "n_ctx": 4096,
            }
        },
        {"prompt_tokens": "6023", "context_window": "4096"},
    ),
    "vllm": (
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
            "(4000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {"context_window": "4096", "requested_tokens": "5000", "prompt_tokens": "4000"},
    ),
    "vllm-new": (
        {
            "object": "error",
            "message": "'max_tokens' or 'max_completion_tokens' is too large: 1000. This model's maximum context "
            "length is 4096 tokens and your request has 3500 input tokens (1000 > 4096 - 3500).",
            "type": "BadRequestError",
            "code": 400,
        },
        {"context_window": "4096", "prompt_tokens": "3500"},
    ),
    "lmstudio": (
        {
            "error": "Trying to keep the first 5000 tokens when context the overflows. However, the model is loaded "
            "with context length of only 4096 tokens, which is not enough. Try to load the model with a larger "
            "context length, or provide a shorter input"
        },
        {"prompt_tokens": "5000", "context_window": "4096"},
    ),
    "ollama": ({"error": "input length exceeds maximum context length"}, {}),
    "openai": (
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens. However, your messages resulted "
                "in 130000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
        {"context_window": "128000", "prompt_tokens": "130000"},
    ),
}


@pytest.mark.parametrize("server", list(OVERFLOWS))
def test_overflow_bodies_are_context_window_exceeded(server: str) -> None:
    body, counts = OVERFLOWS[server]
    error = error_for_status(400, orjson.dumps(body), {}, provider=server, scrub=scrub)
    assert isinstance(error, ContextWindowExceeded), error
    for key, value in counts.items():
        assert error.metadata[key] == value
    assert error.metadata["http_status"] == "400" and error.metadata["source"] == "upstream"


def test_other_rejections_stay_upstream_rejected() -> None:
    body = {"error": {"message": "temperature must be at most 2", "type": "invalid_request_error"}}
    assert isinstance(
        error_for_status(400, orjson.dumps(body), {}, provider="p", scrub=scrub), UpstreamRejected
    )


def test_error_body_is_kept_scrubbed_and_bounded() -> None:
    body = orjson.dumps({"error": {"message": f"bad key {SECRET}", "pad": "x" * 100_000}})
    error = keep_error_body(error_for_status(400, body, {}, provider="p", scrub=scrub), 400, body, scrub)
    kept = json.loads(error.trace_body)  # type: ignore[union-attr]
    assert kept["http_status"] == 400 and kept["truncated"] is True
    assert SECRET not in error.trace_body and "[REDACTED]" in kept["body"]  # type: ignore[union-attr]
    assert len(kept["body"]) <= 16384


def _request(**fields: object) -> chat_pb2.CreateRequest:
    fn = chat_pb2.FunctionDefinition(name="search")
    fn.parameters.update({"type": "object", "properties": {}})
    other = chat_pb2.FunctionDefinition(name="send_message")
    other.parameters.update({"type": "object", "properties": {}})
    cfg = fields.pop("cfg", None) or chat_pb2.LLMConfig(
        model="qwen", model_endpoint="http://127.0.0.1:8080/v1"
    )
    return chat_pb2.CreateRequest(llm_config=cfg, functions=[other, fn], **fields)  # type: ignore[arg-type]


def _answer(*names: str, content: str = "I will not call.", finish: str = "stop") -> dict[str, object]:
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
        for i, n in enumerate(names)
    ]
    message: dict[str, object] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


@pytest.mark.parametrize(
    "fields", [{"force_tool_call": "search"}, {"function_call": "search"}, {"function_call": "required"}]
)
def test_a_required_or_forced_call_answered_without_one_fails(fields: dict[str, str]) -> None:
    request = _request(**fields)
    body = build_chat_body(request, stream=False, endpoint=request.llm_config.model_endpoint)
    with pytest.raises(ToolCallMissing) as caught:
        tool_call_check.check(_answer(), tool_call_check.expected(request, body), provider="openai")
    assert caught.value.reason == "TOOL_CALL_MISSING" and "I will not call." in caught.value.message
    if fields.get("function_call") != "required":  # forced: a call of another function is no answer
        with pytest.raises(ToolCallMissing):
            tool_call_check.check(
                _answer("send_message"), tool_call_check.expected(request, body), provider="x"
            )
    # A LENGTH stop is OK/LENGTH (the call may be what was cut); a call satisfies it.
    tool_call_check.check(_answer(finish="length"), tool_call_check.expected(request, body), provider="x")
    tool_call_check.check(_answer("search"), tool_call_check.expected(request, body), provider="x")


def test_llama_cpp_gets_the_forced_tool_alone_with_required() -> None:
    cfg = chat_pb2.LLMConfig(model="qwen", handle="llamacpp/qwen", model_endpoint="http://127.0.0.1:8080/v1")
    request = _request(cfg=cfg, force_tool_call="search")
    body = build_chat_body(request, stream=False, endpoint=cfg.model_endpoint)
    assert body["tool_choice"] == "required"
    assert [t["function"]["name"] for t in body["tools"]] == ["search"]
    plain = build_chat_body(_request(force_tool_call="search"), stream=False, endpoint=cfg.model_endpoint)
    assert plain["tool_choice"] == {"type": "function", "function": {"name": "search"}}


def test_extra_calls_of_a_server_ignoring_parallel_tool_calls_are_cut_and_traced() -> None:
    cfg = chat_pb2.LLMConfig(model="qwen", handle="llamacpp/qwen", model_endpoint="http://127.0.0.1:8080/v1")
    request = _request(cfg=cfg)
    body = build_chat_body(request, stream=False, endpoint=cfg.model_endpoint)
    answer = _answer("search", "send_message", "search")
    record = TraceRecord(id="t", created_at=None)  # type: ignore[arg-type]
    record.response_json = orjson.dumps(answer).decode()
    tool_call_check.enforce(answer, tool_call_check.expected(request, body), record, provider="llamacpp")
    calls = answer["choices"][0]["message"]["tool_calls"]  # type: ignore[index]
    assert [c["function"]["name"] for c in calls] == ["search"]
    stored = json.loads(record.response_json)
    assert [c["id"] for c in stored[tool_call_check.DROPPED_KEY]] == ["c1", "c2"]


def test_a_model_file_path_is_not_the_answers_model() -> None:
    request = _request()
    answer = {"model": "/models/qwen2.5-7b-q4_k_m.gguf", "choices": []}
    unpack_completion(answer, request)
    assert answer["model"] == "qwen"
    named = {"model": "gpt-4o-2024-08-06", "choices": []}
    unpack_completion(named, request)
    assert named["model"] == "gpt-4o-2024-08-06"
