"""Upstream payloads seen in the wild that once crashed or garbled an answer (review findings)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server.core.completion import completion_from_json, deltas_from_chunks
from server.core.inner_thoughts import unpack_inner_thoughts
from server.core.stream import StreamAccumulator
from server.core.validation import validate_request
from server.errors import GatewayError, InvalidRequest
from server.providers.openai_compat import _decode_event


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_streamed_content_parts_are_text() -> None:
    chunks = [
        _chunk({"content": [{"type": "text", "text": "hi"}, {"type": "text", "text": None}]}),
        _chunk({"content": " there"}, "stop"),
    ]
    accumulator = StreamAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    assert accumulator.completion()["choices"][0]["message"]["content"] == "hi there"
    assert "".join(e.delta.content for e in deltas_from_chunks(chunks)) == "hi there"


def test_answer_content_parts_with_null_text() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": [{"text": None}, {"text": "ok"}]},
            }
        ]
    }
    assert completion_from_json(body, provider="p").choices[0].message.content == "ok"


def test_parallel_tool_calls_without_index_stay_apart() -> None:
    """Gemini's OpenAI endpoint and some proxies omit `index`: a new id is a new call."""
    chunks = [
        _chunk(
            {
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
                ]
            }
        ),
        _chunk({"tool_calls": [{"function": {"arguments": ":1}"}}]}),
        _chunk(
            {
                "tool_calls": [
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"b":2}'}}
                ]
            }
        ),
        _chunk({}, "tool_calls"),
    ]
    accumulator = StreamAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    calls = accumulator.completion()["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_a", "f", '{"a":1}'),
        ("call_b", "g", '{"b":2}'),
    ]
    # The deltas relayed for those chunks carry the same indices as the assembled answer.
    fragments = [t for e in deltas_from_chunks(chunks) for t in e.delta.tool_calls]
    by_index: dict[int, str] = {}
    for fragment in fragments:
        by_index[fragment.index] = by_index.get(fragment.index, "") + fragment.arguments
    assert by_index == {0: '{"a":1}', 1: '{"b":2}'}


def test_unclosed_ipv6_endpoint_is_invalid_request_not_a_crash() -> None:
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="m", model_endpoint_type="openai", model_endpoint="http://[::1/v1"
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="x")],
    )
    with pytest.raises(InvalidRequest) as caught:
        validate_request(request)
    assert caught.value.field_violations[0].field == "llm_config.model_endpoint"


def test_error_object_event_ends_the_stream_with_an_error() -> None:
    """vLLM-style `{"object": "error", ...}` mid-stream must not be skipped as an empty chunk."""
    with pytest.raises(GatewayError) as caught:
        _decode_event(
            b'{"object": "error", "message": "CUDA out of memory", "code": 500}',
            provider="vllm",
            scrub=lambda t: t,
        )
    assert "CUDA out of memory" in caught.value.message


def test_unpacking_thoughts_keeps_big_integers_exact() -> None:
    arguments = '{"thinking": "hmm", "id": 123456789012345678901234567890, "x": 1.5}'
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
                    ],
                },
            }
        ]
    }
    unpack_inner_thoughts(body)
    message = body["choices"][0]["message"]
    assert message["content"] == "hmm"
    left = message["tool_calls"][0]["function"]["arguments"]
    assert "123456789012345678901234567890" in left
    assert json.loads(left) == {"id": 123456789012345678901234567890, "x": 1.5}
