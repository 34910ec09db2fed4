"""The Anthropic translator on OpenAI-shaped request dicts and on the fake's documented payloads."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from server.core.retry import RetryableError
from server.core.stream import StreamAccumulator
from server.errors import (
    ContextWindowExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.providers import anthropic as ant
from tests.fakes import anthropic_fake as fake

USER = {"role": "user", "content": "Hi"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a place",
        "parameters": {"type": "object", "properties": {"location": {"type": ["string", "null"]}},
                       "required": ["location"], "additionalProperties": False},
        "strict": True,
    },
}  # fmt: skip
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather of a place",
    "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
}
PNG = "iVBORw0KGgo="


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "messages": [USER], **fields}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_endpoint_and_headers() -> None:
    assert (
        ant.endpoint_url(ant.DEFAULT_BASE_URL, "claude-x", stream=True)
        == "https://api.anthropic.com/v1/messages"
    )
    assert ant.endpoint_url("http://h/v1", "m", stream=False) == "http://h/v1/messages"
    assert ant.auth_headers("sk-ant-1") == {
        "x-api-key": "sk-ant-1",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }


# -- messages --------------------------------------------------------------------------------

_MESSAGE_CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]] = [
    (
        "system and developer become top-level text blocks, wherever they stand",
        [{"role": "system", "content": "Be brief."}, USER,
         {"role": "developer", "content": [{"type": "text", "text": "Use SI units."}]},
         {"role": "system", "content": ""}],
        [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use SI units."}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    ),
    (
        "adjacent user turns merge so roles alternate",
        [USER, {"role": "user", "content": [{"type": "text", "text": "Still there?"}]}],
        [],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                      {"type": "text", "text": "Still there?"}]}],
    ),
    (
        "tool calls become tool_use; consecutive tool results share one user turn, then the user text",
        [USER,
         {"role": "assistant", "content": None,
          "tool_calls": [_call("toolu_1", "get_weather", '{"location": "Paris"}'),
                         _call("toolu_2", "noop", "")]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
         {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "done"}]},
         {"role": "tool", "tool_call_id": "toolu_3", "content": ""},
         {"role": "user", "content": "Thanks"}],
        [],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [
             {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
             {"type": "tool_use", "id": "toolu_2", "name": "noop", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
             {"type": "tool_result", "tool_use_id": "toolu_2", "content": "done"},
             {"type": "tool_result", "tool_use_id": "toolu_3"},  # empty: sent without content
             {"type": "text", "text": "Thanks"}]}],
    ),
    (
        "an empty assistant turn is left out, the user turns around it merge",
        [USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}],
        [],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "again"}]}],
    ),
    (
        "images: data URL -> base64 source, http URL -> url source, detail ignored",
        [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": f"data:image/PNG;base64,{PNG}", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}],
        [],
        [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]}],
    ),
    (
        "thinking blocks go back first, unchanged; another provider's parts are left out",
        [USER,
         {"role": "assistant", "content": "Let me check.",
          "tool_calls": [_call("toolu_1", "get_weather", "{}")],
          "thinking_blocks": [
              {"type": "thinking", "thinking": "Weather needed.", "signature": "sig-1"},
              {"type": "redacted_thinking", "data": "opaque=="},
              {"type": "gemini_part", "part": {"thoughtSignature": "x"}}]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}],
        [],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [
             {"type": "thinking", "thinking": "Weather needed.", "signature": "sig-1"},
             {"type": "redacted_thinking", "data": "opaque=="},
             {"type": "text", "text": "Let me check."},
             {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
         {"role": "user",
          "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "messages", "system", "turns"), _MESSAGE_CASES, ids=[c[0] for c in _MESSAGE_CASES]
)
def test_messages(
    name: str, messages: list[dict[str, Any]], system: list[dict[str, Any]], turns: list[dict[str, Any]]
) -> None:
    body = _body(messages=messages)
    before = copy.deepcopy(body)
    out = ant.build_body(body, stream=False)
    assert out.get("system", []) == system
    assert out["messages"] == turns
    assert body == before  # the caller's body is never mutated


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "system", "content": "only a system prompt"}], "messages"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
        ([{"role": "user",
           "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}]}],
         "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/cat.png"}}]}],
         "messages[0].content[0].image_url.url"),
        ([USER, {"role": "assistant", "tool_calls": [_call("t", "f", "[1]")]}],
         "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "function", "content": "legacy"}], "messages[0].role"),
    ],
)  # fmt: skip
def test_messages_anthropic_cannot_take(messages: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        ant.build_body(_body(messages=messages), stream=False)
    assert raised.value.metadata["field"] == field
    assert raised.value.metadata["provider"] == "anthropic"
    assert raised.value.field_violations[0].field == field


# -- parameters ------------------------------------------------------------------------------

_PARAM_CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("max_tokens default", {}, {"max_tokens": 4096}, []),
    ("max_completion_tokens", {"max_completion_tokens": 300}, {"max_tokens": 300}, []),
    ("tools: strict dropped, schema passed through", {"tools": [WEATHER]}, {"tools": [WEATHER_TOOL]}, []),
    ("tool without description or parameters",
     {"tools": [{"type": "function", "function": {"name": "ping"}}]},
     {"tools": [{"name": "ping", "input_schema": {"type": "object", "properties": {}}}]}, []),
    ("legacy functions", {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}},
     {"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "get_weather"}}, []),
    ("tool_choice required -> any", {"tools": [WEATHER], "tool_choice": "required"},
     {"tool_choice": {"type": "any"}}, []),
    ("tool_choice named -> tool",
     {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     {"tool_choice": {"type": "tool", "name": "get_weather"}}, []),
    ("tool_choice auto is the default", {"tools": [WEATHER], "tool_choice": "auto"},
     {"tool_choice": None}, []),
    ("tool_choice none", {"tools": [WEATHER], "tool_choice": "none", "parallel_tool_calls": False},
     {"tool_choice": {"type": "none"}}, []),
    ("parallel_tool_calls false",
     {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
     {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, []),
    ("parallel_tool_calls false, auto", {"tools": [WEATHER], "parallel_tool_calls": False},
     {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}, []),
    ("tool_choice without tools", {"tool_choice": "required", "parallel_tool_calls": False},
     {"tool_choice": None}, ["tool_choice", "parallel_tool_calls"]),
    ("temperature and top_p", {"temperature": 0.3, "top_p": 0.9}, {"temperature": 0.3, "top_p": 0.9}, []),
    ("temperature over Anthropic's 1.0 is clamped", {"temperature": 1.7}, {"temperature": 1.0},
     ["temperature"]),
    ("stop string", {"stop": "END"}, {"stop_sequences": ["END"]}, []),
    ("stop list", {"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}, []),
    ("user -> metadata.user_id", {"user": "user-42"}, {"metadata": {"user_id": "user-42"}}, []),
    ("not Anthropic parameters are dropped and named",
     {"seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.1,
      "stream_options": {"include_usage": True}},
     {"seed": None, "frequency_penalty": None, "presence_penalty": None, "stream_options": None},
     ["seed", "frequency_penalty", "presence_penalty"]),
    ("reasoning_effort -> thinking budget, max_tokens leaves room for the answer",
     {"reasoning_effort": "medium"},
     {"thinking": {"type": "enabled", "budget_tokens": 8192}, "max_tokens": 8192 + 4096}, []),
    ("minimal effort is the API's floor", {"reasoning_effort": "minimal"},
     {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1024 + 4096}, []),
    ("a caller max_tokens caps the budget at half",
     {"reasoning_effort": "high", "max_completion_tokens": 10000},
     {"thinking": {"type": "enabled", "budget_tokens": 5000}, "max_tokens": 10000}, []),
    ("too small a max_tokens for the 1024 floor drops thinking",
     {"reasoning_effort": "low", "max_completion_tokens": 1500}, {"thinking": None, "max_tokens": 1500},
     ["reasoning_effort"]),
    ("thinking takes no temperature and top_p only from 0.95",
     {"reasoning_effort": "low", "temperature": 0.2, "top_p": 0.5},
     {"thinking": {"type": "enabled", "budget_tokens": 2048}, "temperature": None, "top_p": None},
     ["temperature", "top_p"]),
    ("thinking keeps a top_p of 0.95 or more", {"reasoning_effort": "low", "top_p": 0.97},
     {"top_p": 0.97}, []),
    ("a forced tool keeps its forcing and drops thinking",
     {"tools": [WEATHER], "tool_choice": "required", "reasoning_effort": "high"},
     {"tool_choice": {"type": "any"}, "thinking": None, "max_tokens": 4096}, ["reasoning_effort"]),
    ("thinking with tool_choice auto", {"tools": [WEATHER], "reasoning_effort": "low"},
     {"tool_choice": None, "thinking": {"type": "enabled", "budget_tokens": 2048}}, []),
    ("stream", {"stream": True}, {"stream": True}, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "fields", "expected", "notes"), _PARAM_CASES, ids=[c[0] for c in _PARAM_CASES]
)
def test_parameters(name: str, fields: dict[str, Any], expected: dict[str, Any], notes: list[str]) -> None:
    out, dropped = ant.build_body_with_notes(_body(**fields), stream=bool(fields.get("stream")))
    for key, value in expected.items():
        assert out.get(key) == value, key
    assert dropped == notes
    assert out["model"] == "claude-sonnet-4-5"
    assert ant.build_body(_body(**fields), stream=bool(fields.get("stream"))) == out


def test_body_key_order_and_no_stream_flag() -> None:
    out = ant.build_body(
        _body(messages=[{"role": "system", "content": "S"}, USER], tools=[WEATHER], tool_choice="required"),
        stream=False,
    )
    assert list(out) == ["model", "max_tokens", "system", "messages", "tools", "tool_choice"]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
ANSWER_TOOL = {"name": "json_response__answer", "description": "Give the answer as this tool's input.",
               "input_schema": SCHEMA}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "tools", "choice", "notes"),
    [
        ({}, [ANSWER_TOOL], {"type": "tool", "name": "json_response__answer"}, []),
        ({"tools": [WEATHER]}, [WEATHER_TOOL, ANSWER_TOOL], {"type": "any"}, []),
        ({"tools": [WEATHER], "parallel_tool_calls": False}, [WEATHER_TOOL, ANSWER_TOOL],
         {"type": "any", "disable_parallel_tool_use": True}, []),
        ({"tools": [WEATHER], "tool_choice": "none"}, [WEATHER_TOOL, ANSWER_TOOL],
         {"type": "tool", "name": "json_response__answer"}, []),
        ({"tools": [WEATHER], "tool_choice": "required"}, [WEATHER_TOOL], {"type": "any"},
         ["response_format"]),
        ({"reasoning_effort": "low"}, [ANSWER_TOOL], {"type": "tool", "name": "json_response__answer"},
         ["reasoning_effort"]),
    ],
)  # fmt: skip
def test_json_schema_is_a_forced_tool(
    fields: dict[str, Any], tools: list[dict[str, Any]], choice: dict[str, Any], notes: list[str]
) -> None:
    # A model before Claude 4.5: no structured outputs, so the schema becomes a forced tool.
    body = {**_body(response_format=JSON_SCHEMA, **fields), "model": "claude-sonnet-4-20250514"}
    out, dropped = ant.build_body_with_notes(body, stream=False)
    assert out["tools"] == tools
    assert out["tool_choice"] == choice
    assert "thinking" not in out
    assert dropped == notes


@pytest.mark.parametrize(
    "fields",
    [{}, {"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "required"}, {"reasoning_effort": "low"}],
)
def test_json_schema_is_native_structured_output_on_claude_4_5(fields: dict[str, Any]) -> None:
    out, dropped = ant.build_body_with_notes(_body(response_format=JSON_SCHEMA, **fields), stream=False)
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    # No emulation tool, and the caller's tool choice and thinking are kept as they were.
    assert all(t["name"] != "json_response__answer" for t in out.get("tools", []))
    assert "response_format" not in dropped


@pytest.mark.parametrize(
    ("model", "native"),
    [
        ("claude-sonnet-4-5", True), ("claude-sonnet-4-5-20250929", True), ("claude-haiku-4-5", True),
        ("claude-opus-4-6", True), ("claude-opus-5", True), ("claude-opus-4-1", False),
        ("claude-sonnet-4-20250514", False), ("claude-3-7-sonnet-latest", False), ("gpt-4o", False),
    ],
)  # fmt: skip
def test_structured_outputs_models(model: str, native: bool) -> None:
    assert ant.structured_outputs(model) is native


def test_json_object_and_text_formats() -> None:
    out = ant.build_body(_body(response_format={"type": "json_object"}), stream=False)
    assert out["tools"][0]["name"] == "json_response__object"
    assert out["tools"][0]["input_schema"] == {"type": "object"}
    assert "tools" not in ant.build_body(_body(response_format={"type": "text"}), stream=False)
    with pytest.raises(InvalidRequest):
        ant.build_body(_body(response_format={"type": "xml"}), stream=False)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"tools": [WEATHER], "tool_choice": 3}, "tool_choice"),
    ],
)
def test_parameters_anthropic_cannot_take(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        ant.build_body(_body(**fields), stream=False)
    assert raised.value.metadata["field"] == field


# -- completions -----------------------------------------------------------------------------


def test_parse_text_with_cache_usage() -> None:
    payload = fake.message(usage_=fake.usage(10, 5, cache_read=100, cache_write=20))
    out = ant.parse_completion(payload, model="claude-sonnet-4-5")
    assert out["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert out["object"] == "chat.completion"
    assert out["model"] == fake.MODEL
    assert isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}
    ]
    assert out["usage"] == {
        "prompt_tokens": 130,
        "completion_tokens": 5,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100},
        "cache_write_tokens": 20,
    }


def test_parse_thinking_tools_and_redacted() -> None:
    payload = fake.message(
        [
            fake.thinking_block("Step one.", "sig-a"),
            {"type": "redacted_thinking", "data": "opaque=="},
            fake.text_block("Checking."),
            fake.tool_use_block("get_weather", {"location": "Paris"}, "toolu_1"),
            fake.tool_use_block("get_time", {}, "toolu_2"),
        ],
        stop_reason="tool_use",
    )
    payload["usage"]["output_tokens_details"] = {"thinking_tokens": 7}
    out = ant.parse_completion(payload, model="m")
    message = out["choices"][0]["message"]
    assert message["content"] == "Checking."
    assert message["reasoning_content"] == "Step one."
    assert message["tool_calls"] == [
        _call("toolu_1", "get_weather", '{"location":"Paris"}'),
        _call("toolu_2", "get_time", "{}"),
    ]
    assert message["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Step one.", "signature": "sig-a"},
        {"type": "redacted_thinking", "data": "opaque=="},
    ]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 7}


def test_thinking_blocks_round_trip_into_the_next_turn() -> None:
    payload = fake.message(
        [
            fake.thinking_block("Hmm.", "sig-z"),
            fake.tool_use_block("get_weather", {"location": "Oslo"}, "t1"),
        ],
        stop_reason="tool_use",
    )
    assistant = ant.parse_completion(payload, model="m")["choices"][0]["message"]
    turn = ant.build_body(
        _body(messages=[USER, assistant, {"role": "tool", "tool_call_id": "t1", "content": "cold"}]),
        stream=False,
    )["messages"][1]
    assert turn["content"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig-z"},
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"location": "Oslo"}},
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    out = ant.parse_completion(fake.message(stop_reason=stop_reason), model="m")
    assert out["choices"][0]["finish_reason"] == finish


def test_refusal_comes_back() -> None:
    payload = fake.message([], stop_reason="refusal")
    payload["stop_details"] = {"type": "refusal", "category": "cyber", "explanation": "Not this one."}
    message = ant.parse_completion(payload, model="m")["choices"][0]["message"]
    assert message["refusal"] == "Not this one."
    assert message["content"] is None
    bare = ant.parse_completion(fake.message([], stop_reason="refusal"), model="m")
    assert bare["choices"][0]["message"]["refusal"] == "the model refused to answer"


def test_the_json_response_tool_comes_back_as_content() -> None:
    payload = fake.message(
        [fake.tool_use_block("json_response__answer", {"city": "Paris"})], stop_reason="tool_use"
    )
    choice = ant.parse_completion(payload, model="m")["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": '{"city":"Paris"}'}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "error", "error": {"type": "api_error", "message": "x"}},
        {"type": "message", "content": "text"},
        {"type": "message", "content": ["text"], "usage": {}},
        {"type": "message", "content": [], "usage": None},
        {"type": "message", "content": [], "usage": {"input_tokens": "12", "output_tokens": 1}},
    ],
)
def test_unreadable_answers(payload: dict[str, Any]) -> None:
    with pytest.raises(UpstreamBadResponse) as raised:
        ant.parse_completion(payload, model="m")
    assert raised.value.metadata["provider"] == "anthropic"


# -- streams ---------------------------------------------------------------------------------


def _decode(
    events: list[fake.Event], decoder: ant.StreamDecoder | None = None
) -> list[dict[str, Any] | None]:
    decoder = decoder or ant.StreamDecoder(scrub=str, model="claude-sonnet-4-5")
    out: list[dict[str, Any] | None] = []
    for name, data in events:
        out.extend(decoder.feed(name, orjson.dumps(data)))
    out.extend(decoder.finish())
    return out


def _deltas(chunks: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c is not None]


def _assembled(chunks: list[dict[str, Any] | None]) -> dict[str, Any]:
    accumulator = StreamAccumulator()
    for chunk in chunks:
        if chunk is not None:
            accumulator.add(chunk)
    return accumulator.completion()


def test_text_stream_with_ping() -> None:
    chunks = _decode(fake.text_stream(["Hello", " world"]))
    assert chunks[-1] is None
    assert _deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
        {},
    ]
    last = chunks[-2]
    assert last is not None
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["prompt_tokens"] == 25 and last["usage"]["completion_tokens"] == 15
    assert {c["id"] for c in chunks if c} == {"msg_01XFDUDYJgAACzvnptvVoYEL"}
    assert {c["model"] for c in chunks if c} == {fake.MODEL}
    assert _assembled(chunks)["choices"][0]["message"]["content"] == "Hello world"


def test_thinking_and_two_tools_stream() -> None:
    chunks = _decode(fake.thinking_tools_stream())
    deltas = _deltas(chunks)
    assert {"reasoning_content": "Let me think"} in deltas
    assert {"thinking_blocks": [{"type": "thinking", "thinking": "Let me think about the weather.",
                                 "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}]} in deltas  # fmt: skip
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # The OpenAI index counts tool calls (0, 1), not content blocks (2, 3).
    assert calls[0] == {"index": 0, "id": "toolu_01A", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert [c["index"] for c in calls] == [0, 0, 0, 1, 1]
    completion = _assembled(chunks)
    message = completion["choices"][0]["message"]
    assert message["content"] == "Checking both."
    assert message["reasoning_content"] == "Let me think about the weather."
    assert [
        (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ] == [
        ("toolu_01A", "get_weather", {"location": "Paris"}),
        ("toolu_01B", "get_time", {"tz": "CET"}),
    ]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    # Cache counts come in message_start only; message_delta's output count is cumulative.
    assert completion["usage"] == {
        "prompt_tokens": 472 + 100 + 50,
        "completion_tokens": 89,
        "total_tokens": 472 + 100 + 50 + 89,
        "prompt_tokens_details": {"cached_tokens": 100},
        "cache_write_tokens": 50,
    }


def test_redacted_thinking_and_a_tool_without_input() -> None:
    events = [
        fake.message_start(),
        fake.block_start(0, {"type": "redacted_thinking", "data": "opaque=="}),
        fake.block_stop(0),
        *fake.tool_events(1, "list_files", "toolu_9", []),
        fake.message_delta("tool_use", 30),
        fake.MESSAGE_STOP,
    ]
    deltas = _deltas(_decode(events))
    assert {"thinking_blocks": [{"type": "redacted_thinking", "data": "opaque=="}]} in deltas
    assert {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]} in deltas


def test_message_delta_usage_is_cumulative_and_replaces() -> None:
    events = [
        fake.message_start(10, cache_read=4),
        *fake.text_events(0, ["a"]),
        fake.message_delta("end_turn", 3),
        # A later, cumulative delta (newer API versions also repeat the input counts).
        fake.message_delta("end_turn", 8, input_tokens=10, cache_read_input_tokens=4),
        fake.MESSAGE_STOP,
    ]
    chunks = _decode(events)
    usage = [c["usage"] for c in chunks if c and "usage" in c]
    assert usage == [
        {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22,
         "prompt_tokens_details": {"cached_tokens": 4}, "cache_write_tokens": 0}
    ]  # fmt: skip
    assert sum(1 for c in chunks if c and c["choices"][0]["finish_reason"]) == 1


def test_stream_refusal_and_json_response_tool() -> None:
    refusal = [fake.message_start(), *fake.text_events(0, ["I can"]), fake.message_delta("refusal", 2),
               fake.MESSAGE_STOP]  # fmt: skip
    last = _decode(refusal)[-2]
    assert last is not None
    assert last["choices"][0] == {
        "index": 0,
        "delta": {"refusal": "I can"},
        "finish_reason": "content_filter",
    }
    answer = [fake.message_start(),
              *fake.tool_events(0, "json_response__answer", "t", ['{"city": ', '"Oslo"}']),
              fake.message_delta("tool_use", 9), fake.MESSAGE_STOP]  # fmt: skip
    completion = _assembled(_decode(answer))
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": '{"city": "Oslo"}'}
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_unknown_events_and_delta_types_are_skipped() -> None:
    decoder = ant.StreamDecoder(scrub=str)
    decoder.feed("message_start", orjson.dumps(fake.message_start()[1]))
    decoder.feed("content_block_start", orjson.dumps(fake.block_start(0, {"type": "text", "text": ""})[1]))
    assert decoder.feed("future_event", b'{"type": "future_event"}') == []
    assert decoder.feed(*_raw(fake.block_delta(0, {"type": "citations_delta", "citation": {}}))) == []
    assert decoder.feed("ping", b"{}") == []


def _raw(event: fake.Event) -> tuple[str, bytes]:
    return event[0], orjson.dumps(event[1])


@pytest.mark.parametrize(
    ("error_type", "error_class", "reason"),
    [
        ("overloaded_error", UpstreamUnavailable, "UPSTREAM_UNAVAILABLE"),
        ("rate_limit_error", RateLimitExceeded, "RATE_LIMIT_EXCEEDED"),
        ("api_error", UpstreamUnavailable, "UPSTREAM_UNAVAILABLE"),
        ("invalid_request_error", UpstreamRejected, "UPSTREAM_REJECTED"),
        ("something_new", UpstreamUnavailable, "UPSTREAM_UNAVAILABLE"),
    ],
)
def test_error_event_after_a_200_raises(
    error_type: str, error_class: type[GatewayError], reason: str
) -> None:
    decoder = ant.StreamDecoder(scrub=lambda s: s.replace("sk-ant-secret", "[redacted]"))
    events = [fake.message_start(), fake.PING, *fake.text_events(0, ["Hel"])]
    for name, data in events:
        decoder.feed(name, orjson.dumps(data))
    with pytest.raises(error_class) as raised:
        decoder.feed("error", orjson.dumps(fake.error_body(error_type, "Overloaded, key sk-ant-secret")))
    error = raised.value
    assert error.reason == reason
    assert error.metadata["provider"] == "anthropic"
    assert error.metadata["error_type"] == error_type
    assert error.metadata["http_status"] == "200"
    assert error.metadata["request_id"] == fake.REQUEST_ID
    assert "sk-ant-secret" not in error.message and "[redacted]" in error.message


@pytest.mark.parametrize(
    "events",
    [
        [fake.message_start(), *fake.text_events(0, ["cut"])],  # the body ends before message_stop
        [fake.message_start(), fake.MESSAGE_STOP],  # no stop reason
        [fake.message_start(), fake.block_delta(3, {"type": "text_delta", "text": "x"})],  # never started
    ],
)
def test_broken_streams_never_look_complete(events: list[fake.Event]) -> None:
    with pytest.raises((UpstreamUnavailable, UpstreamBadResponse)):
        _decode(events)


def test_unreadable_events() -> None:
    decoder = ant.StreamDecoder(scrub=str)
    with pytest.raises(UpstreamBadResponse):
        decoder.feed("message_start", b"not json")
    with pytest.raises(UpstreamBadResponse):
        decoder.feed("message_start", b"[1]")


# -- errors ----------------------------------------------------------------------------------


def _error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> Any:
    body = orjson.dumps(fake.error_body(error_type, message))
    return ant.error_for_status(status, body, headers or {}, scrub=str)


@pytest.mark.parametrize(
    ("status", "error_type", "message", "error_class"),
    [
        (400, "invalid_request_error", "max_tokens: 10000 > 8192", UpstreamRejected),
        (401, "authentication_error", "invalid x-api-key", UpstreamAuthFailed),
        (403, "permission_error", "no permission", UpstreamAuthFailed),
        (404, "not_found_error", "model: claude-nope", ModelNotFound),
        (413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", UpstreamRejected),
        (402, "billing_error", "credit balance too low", UpstreamRejected),
    ],
)
def test_error_statuses(status: int, error_type: str, message: str, error_class: type[GatewayError]) -> None:
    error = _error(status, error_type, message)
    assert type(error) is error_class
    assert error.metadata["provider"] == "anthropic"
    assert error.metadata["error_type"] == error_type
    assert error.metadata["http_status"] == str(status)
    assert error.metadata["request_id"] == fake.REQUEST_ID
    assert message in error.message


def test_bare_404_names_the_endpoint() -> None:
    error = ant.error_for_status(404, b"404: Not Found", {}, scrub=str)
    assert isinstance(error, NotFound)
    assert error.metadata["not_found"] == "endpoint"


def test_prompt_too_long_is_context_window_exceeded() -> None:
    error = _error(400, "invalid_request_error", "prompt is too long: 209353 tokens > 200000 maximum")
    assert isinstance(error, ContextWindowExceeded)
    assert (error.metadata["prompt_tokens"], error.metadata["context_window"]) == ("209353", "200000")
    bare = _error(400, "invalid_request_error", "Prompt is too long")
    assert isinstance(bare, ContextWindowExceeded) and "prompt_tokens" not in bare.metadata


def test_429_honours_retry_after() -> None:
    mapped = _error(429, "rate_limit_error", "slow down", fake.RATE_LIMIT_HEADERS)
    assert isinstance(mapped, RetryableError)
    assert (mapped.status, mapped.retry_after) == (429, 7.0)
    assert isinstance(mapped.error, RateLimitExceeded)
    assert mapped.error.retry_delay == 7.0
    assert mapped.error.metadata["error_type"] == "rate_limit_error"


@pytest.mark.parametrize(("status", "retry_status"), [(500, 500), (529, 503), (504, 504)])
def test_5xx_and_529_are_retried_like_5xx(status: int, retry_status: int) -> None:
    mapped = _error(
        status, "overloaded_error" if status == 529 else "api_error", "busy", {"retry-after": "2"}
    )
    assert isinstance(mapped, RetryableError)
    # 529 is not in the standard retry statuses: the retry loop sees the 503 it stands for.
    assert mapped.status == retry_status and mapped.retry_after == 2.0
    assert isinstance(mapped.error, UpstreamUnavailable)
    assert mapped.error.metadata["http_status"] == str(status)


def test_error_messages_are_scrubbed_and_bounded() -> None:
    body = orjson.dumps(fake.error_body("invalid_request_error", "bad key sk-ant-xyz " + "x" * 5000))
    error = ant.error_for_status(
        400, body, {"request-id": "req_h"}, scrub=lambda s: s.replace("sk-ant-xyz", "***")
    )
    assert isinstance(error, UpstreamRejected)
    assert "sk-ant-xyz" not in error.message and "***" in error.message
    assert len(error.message) < 1200
    assert error.metadata["request_id"] == fake.REQUEST_ID  # the body's id wins over the header's
