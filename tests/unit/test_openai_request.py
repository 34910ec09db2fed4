"""The exact chat-completions body built from a request: messages, tools, extras."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.core import openai_request
from server.core.messages import functions_to_dicts, to_openai_messages
from server.core.openai_request import build_chat_body, prompt_functions
from server.errors import InvalidRequest

OPENAI = "https://api.openai.com/v1"
NEBIUS = "https://api.studio.nebius.com/v1"

SEND = {
    "name": "send_message",
    "description": "Sends a message to the human user.",
    "parameters": {
        "type": "object",
        "properties": {"message": {"type": "string", "description": "Message contents."}},
        "required": ["message"],
    },
}
SEARCH = {
    "name": "search",
    "description": "Search archival memory.",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "page": {"type": "integer", "minimum": 0},
        },
        "required": ["query"],
    },
}
SEND_STRICT = {
    "type": "function",
    "function": {
        "name": "send_message",
        "description": "Sends a message to the human user.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string", "description": "Message contents."}},
            "additionalProperties": False,
            "required": ["message"],
        },
    },
}
SEARCH_STRICT = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search archival memory.",
        "strict": True,
        "parameters": {
            "type": "object",
            # `page` was optional: required and nullable, OpenAI's pattern for optional.
            "properties": {"query": {"type": "string"}, "page": {"type": ["integer", "null"], "minimum": 0}},
            "additionalProperties": False,
            "required": ["query", "page"],
        },
    },
}
USER_HI = {"role": "user", "content": "hi"}


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    openai_request.clear_caches()
    yield
    openai_request.clear_caches()


def make(
    *,
    model: str = "gpt-4o",
    functions: tuple[dict[str, Any], ...] = (),
    messages: tuple[chat_pb2.Message, ...] = (chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi"),),
    config: dict[str, Any] | None = None,
    **fields: Any,
) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model=model, model_endpoint=OPENAI, **(config or {})),
        messages=list(messages),
        functions=[chat_pb2.FunctionDefinition(**f) for f in functions],
        **fields,
    )


def body_of(req: chat_pb2.CreateRequest, *, stream: bool = False, endpoint: str = OPENAI) -> dict[str, Any]:
    return build_chat_body(req, stream=stream, endpoint=endpoint)


def assert_exact(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal including key order, i.e. byte-identical JSON."""
    assert actual == expected
    assert orjson.dumps(actual) == orjson.dumps(expected)


# -- the body ------------------------------------------------------------------------------


def test_minimal_body() -> None:
    assert_exact(body_of(make()), {"model": "gpt-4o", "messages": [USER_HI]})


def test_full_body_key_order() -> None:
    req = make(
        functions=(SEND, SEARCH),
        config={"max_tokens": 512, "temperature": 0.5, "reasoning_effort": "low"},
        user_id="user-42",
    )
    assert_exact(
        body_of(req, stream=True),
        {
            "model": "gpt-4o",
            "messages": [USER_HI],
            "tools": [SEND_STRICT, SEARCH_STRICT],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_completion_tokens": 512,
            "temperature": 0.5,
            "reasoning_effort": "low",
            "user": "user-42",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )


@pytest.mark.parametrize(
    ("fields", "config", "handle", "endpoint", "expected"),
    [
        ({}, {}, "", OPENAI, "required"),
        ({}, {}, "vllm/qwen", OPENAI, "auto"),
        ({}, {}, "", NEBIUS, "auto"),
        ({}, {}, "mlx/qwen3", OPENAI, "auto"),
        ({"function_call": "auto"}, {}, "", OPENAI, "auto"),
        ({"function_call": "none"}, {}, "", OPENAI, "none"),
        ({"function_call": "required"}, {}, "vllm/q", OPENAI, "required"),
        ({"function_call": "search"}, {}, "", OPENAI, {"type": "function", "function": {"name": "search"}}),
        ({"force_tool_call": "search"}, {}, "", OPENAI, {"type": "function", "function": {"name": "search"}}),
        (
            {"function_call": "send_message", "force_tool_call": "search"},
            {},
            "",
            OPENAI,
            {"type": "function", "function": {"name": "search"}},
        ),
    ],
)
def test_tool_choice_in_body(
    fields: dict[str, Any], config: dict[str, Any], handle: str, endpoint: str, expected: object
) -> None:
    req = make(functions=(SEND, SEARCH), config={"handle": handle, **config}, **fields)
    assert body_of(req, endpoint=endpoint)["tool_choice"] == expected


def test_function_call_without_functions_is_dropped() -> None:
    assert_exact(body_of(make(function_call="search")), {"model": "gpt-4o", "messages": [USER_HI]})
    assert_exact(body_of(make(function_call="auto")), {"model": "gpt-4o", "messages": [USER_HI]})


@pytest.mark.parametrize(
    ("fields", "functions", "field"),
    [
        ({"force_tool_call": "nope"}, (SEND,), "force_tool_call"),
        ({"function_call": "nope"}, (SEND,), "function_call"),
        ({"force_tool_call": "send_message"}, (), "force_tool_call"),
    ],
)
def test_forcing_an_unknown_function(fields: dict[str, Any], functions: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        body_of(make(functions=functions, **fields))
    assert [v.field for v in info.value.field_violations] == [field]


def test_nebius_gets_no_strict_schemas() -> None:
    body = body_of(make(functions=(SEND,)), endpoint=NEBIUS)
    assert_exact(
        body["tools"][0],
        {
            "type": "function",
            "function": {
                "name": "send_message",
                "description": "Sends a message to the human user.",
                # Struct keys come back sorted (see server.core.messages)
                "parameters": {
                    "properties": {"message": {"description": "Message contents.", "type": "string"}},
                    "required": ["message"],
                    "type": "object",
                },
            },
        },
    )
    assert body["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("fields", "functions", "expected_call"),
    [
        ({}, (SEND, SEARCH), "auto"),  # "required" has no legacy form: several functions -> auto
        ({}, (SEND,), {"name": "send_message"}),  # ... one function -> that one
        ({"function_call": "none"}, (SEND, SEARCH), "none"),
        ({"function_call": "auto"}, (SEND, SEARCH), "auto"),
        ({"function_call": "search"}, (SEND, SEARCH), {"name": "search"}),
        ({"force_tool_call": "search"}, (SEND, SEARCH), {"name": "search"}),
    ],
)
def test_legacy_shape(fields: dict[str, Any], functions: Any, expected_call: object) -> None:
    body = body_of(make(functions=functions, use_tool_naming=False, **fields))
    assert list(body) == ["model", "messages", "functions", "function_call"]
    assert body["function_call"] == expected_call
    # legacy functions are not strict-converted (the seed converts only `tools`)
    assert body["functions"] == functions_to_dicts(make(functions=functions).functions)
    assert all("strict" not in f for f in body["functions"])


def test_use_tool_naming_true_explicitly() -> None:
    body = body_of(make(functions=(SEND,), use_tool_naming=True))
    assert body["tools"] == [SEND_STRICT]


@pytest.mark.parametrize(
    ("model", "temperature_sent", "parallel"),
    [
        ("gpt-4o", 0.25, True),
        ("gpt-4.1-mini", 0.25, True),
        ("o1", 1.0, False),
        ("o1-mini", 1.0, False),
        ("o3-mini", 1.0, False),
        ("o4-mini", 1.0, False),
        ("gpt-5", 1.0, False),
        ("gpt-5-mini", 1.0, False),
    ],
)
def test_temperature_and_parallel_tool_calls_per_family(
    model: str, temperature_sent: float, parallel: bool
) -> None:
    body = body_of(make(model=model, functions=(SEND,), config={"temperature": 0.25}))
    assert body["temperature"] == temperature_sent
    assert ("parallel_tool_calls" in body) is parallel
    if parallel:
        assert body["parallel_tool_calls"] is False


@pytest.mark.parametrize("model", ["gpt-4o", "o3"])
def test_no_temperature_when_unset(model: str) -> None:
    assert "temperature" not in body_of(make(model=model))


def test_temperature_zero_is_sent() -> None:
    assert body_of(make(config={"temperature": 0.0}))["temperature"] == 0.0


def test_max_completion_tokens() -> None:
    assert body_of(make(config={"max_tokens": 256}))["max_completion_tokens"] == 256
    assert "max_completion_tokens" not in body_of(make())
    with pytest.raises(InvalidRequest) as info:
        body_of(make(config={"max_tokens": 0}))
    assert info.value.field_violations[0].field == "llm_config.max_tokens"


def test_reasoning_effort_user_and_stream() -> None:
    body = body_of(make(model="o3", config={"reasoning_effort": "high"}, user_id="u1"), stream=True)
    assert_exact(
        body,
        {
            "model": "o3",
            "messages": [USER_HI],
            "reasoning_effort": "high",
            "user": "u1",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    plain = body_of(make())
    assert "stream" not in plain and "stream_options" not in plain and "user" not in plain


def test_empty_model_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as info:
        body_of(make(model=""))
    assert info.value.field_violations[0].field == "llm_config.model"


def test_other_request_types_are_accepted() -> None:
    for cls in (chat_pb2.StreamCreateRequest, chat_pb2.CountTokensRequest):
        req = cls()
        req.ParseFromString(make(functions=(SEND,)).SerializeToString())
        same_fields = cast(chat_pb2.CreateRequest, req)
        assert build_chat_body(same_fields, stream=False, endpoint=OPENAI)["tools"] == [SEND_STRICT]


# -- messages ------------------------------------------------------------------------------

M = chat_pb2.Message
TC = chat_pb2.ToolCall


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (M(role=chat_pb2.ROLE_SYSTEM, content="sys"), {"role": "system", "content": "sys"}),
        (M(role=chat_pb2.ROLE_DEVELOPER, content="dev"), {"role": "developer", "content": "dev"}),
        (
            M(role=chat_pb2.ROLE_USER, content="u", name="alice"),
            {"role": "user", "content": "u", "name": "alice"},
        ),
        (M(role=chat_pb2.ROLE_ASSISTANT, content="a"), {"role": "assistant", "content": "a"}),
        (M(role=chat_pb2.ROLE_ASSISTANT), {"role": "assistant", "content": ""}),
        (
            M(role=chat_pb2.ROLE_ASSISTANT, tool_calls=[TC(id="c1", name="f", arguments='{"x": 1}')]),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                ],
            },
        ),
        (
            M(
                role=chat_pb2.ROLE_ASSISTANT,
                content="thinking aloud",
                tool_calls=[TC(id="c1", name="f", arguments="{}"), TC(id="c2", name="g", arguments="[]")],
            ),
            {
                "role": "assistant",
                "content": "thinking aloud",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[]"}},
                ],
            },
        ),
        (
            M(role=chat_pb2.ROLE_TOOL, content='{"status": "OK"}', tool_call_id="c1", name="f"),
            {"role": "tool", "content": '{"status": "OK"}', "tool_call_id": "c1", "name": "f"},
        ),
        (
            M(
                role=chat_pb2.ROLE_USER,
                content="look",
                parts=[
                    chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://x/y.png", detail="low")),
                    chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="data:image/png;base64,AAAA")),
                    chat_pb2.ContentPart(text="and this"),
                ],
            ),
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "and this"},
                ],
            },
        ),
        (
            M(role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart(text="only parts")]),
            {"role": "user", "content": [{"type": "text", "text": "only parts"}]},
        ),
    ],
)
def test_message_conversion(message: chat_pb2.Message, expected: dict[str, Any]) -> None:
    [actual] = to_openai_messages([message], model="gpt-4o")
    assert_exact(actual, expected)


@pytest.mark.parametrize(
    ("model", "role"),
    [
        ("gpt-4o", "system"),
        ("gpt-4.1", "system"),
        ("o1", "developer"),
        ("o1-mini", "system"),
        ("o1-preview", "developer"),
        ("o3-mini", "developer"),
        ("o4-mini", "developer"),
        ("gpt-5", "developer"),
        ("gpt-5-nano", "developer"),
    ],
)
def test_system_role_per_model_family(model: str, role: str) -> None:
    body = body_of(make(model=model, messages=(M(role=chat_pb2.ROLE_SYSTEM, content="s"),)))
    assert body["messages"] == [{"role": role, "content": "s"}]
    # an explicit developer message stays developer everywhere
    dev = to_openai_messages([M(role=chat_pb2.ROLE_DEVELOPER, content="d")], model=model)
    assert dev == [{"role": "developer", "content": "d"}]


@pytest.mark.parametrize("role", [chat_pb2.ROLE_UNSPECIFIED, 42])
def test_invalid_role(role: int) -> None:
    messages = [M(role=chat_pb2.ROLE_USER, content="ok"), M(role=cast(Any, role), content="bad")]
    with pytest.raises(InvalidRequest) as info:
        to_openai_messages(messages, model="gpt-4o")
    err = info.value
    assert err.reason == "INVALID_REQUEST"
    assert [v.field for v in err.field_violations] == ["messages[1].role"]
    assert err.metadata == {"field": "messages[1].role", "role": str(role)}


@pytest.mark.parametrize("arguments", ["{not json", "", '{"a": 1'])
def test_invalid_tool_call_arguments(arguments: str) -> None:
    messages = [
        M(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[TC(id="c0", name="f", arguments="{}"), TC(id="c1", name="f", arguments=arguments)],
        )
    ]
    with pytest.raises(InvalidRequest) as info:
        to_openai_messages([M(role=chat_pb2.ROLE_USER, content="x"), *messages], model="gpt-4o")
    assert [v.field for v in info.value.field_violations] == ["messages[1].tool_calls[1].arguments"]


def test_empty_content_part_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as info:
        to_openai_messages([M(role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart()])], model="gpt-4o")
    assert info.value.field_violations[0].field == "messages[0].parts[0]"


# -- function definitions ------------------------------------------------------------------


def test_struct_numbers_and_order_are_restored() -> None:
    fn = {
        "name": "f",
        "description": "",
        "parameters": {
            "type": "object",
            "properties": {
                "z_tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                "b_ratio": {"type": "number", "minimum": 0.5, "default": 2},
                "a_flag": {"type": "boolean", "enum": [True, False]},
                "m_anything": {"type": "string", "default": None},
            },
            "required": ["z_tags", "b_ratio"],
        },
    }
    [d] = functions_to_dicts(make(functions=(fn,)).functions)
    expected = {
        "name": "f",
        "description": "",
        "parameters": {
            "properties": {
                # required order first, then the rest sorted
                "z_tags": {"items": {"type": "string"}, "maxItems": 3, "minItems": 1, "type": "array"},
                "b_ratio": {"default": 2, "minimum": 0.5, "type": "number"},
                "a_flag": {"enum": [True, False], "type": "boolean"},
                "m_anything": {"default": None, "type": "string"},
            },
            "required": ["z_tags", "b_ratio"],
            "type": "object",
        },
    }
    assert_exact(d, expected)
    assert type(d["parameters"]["properties"]["z_tags"]["minItems"]) is int
    assert type(d["parameters"]["properties"]["b_ratio"]["default"]) is int


def test_function_without_parameters() -> None:
    [d] = functions_to_dicts([chat_pb2.FunctionDefinition(name="ping")])
    assert_exact(d, {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}})
    body = body_of(make(functions=({"name": "ping"},)))
    assert body["tools"][0]["function"]["parameters"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
        "required": [],
    }


def test_function_name_required() -> None:
    with pytest.raises(InvalidRequest) as info:
        body_of(make(functions=(SEND, {"description": "x"})))
    assert info.value.field_violations[0].field == "functions[1].name"


def test_unconvertible_function_is_sent_as_is(caplog: pytest.LogCaptureFixture) -> None:
    free = {
        "name": "set_vars",
        "description": "Set variables.",
        "parameters": {"type": "object", "properties": {"vars": {"type": "object"}}, "required": ["vars"]},
    }
    with caplog.at_level(logging.WARNING):
        body = body_of(make(functions=(SEND, free)))
    assert body["tools"][0] == SEND_STRICT
    assert_exact(
        body["tools"][1],
        {
            "type": "function",
            "function": {
                "name": "set_vars",
                "description": "Set variables.",
                "parameters": {
                    "properties": {"vars": {"type": "object"}},
                    "required": ["vars"],
                    "type": "object",
                },
            },
        },
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "set_vars" in warnings[0].getMessage()


# -- prompt_functions and caching ----------------------------------------------------------


def test_prompt_functions_are_what_is_sent_before_strict() -> None:
    req = make(functions=(SEND, SEARCH), config={"put_inner_thoughts_in_kwargs": True})
    counted = prompt_functions(req)
    assert [f["name"] for f in counted] == ["send_message", "search"]
    assert all("strict" not in f for f in counted)
    assert list(counted[1]["parameters"]["properties"]) == ["thinking", "query", "page"]
    sent = body_of(req)["tools"]
    assert list(sent[1]["function"]["parameters"]["properties"]) == ["thinking", "query", "page"]


def test_prompt_functions_without_functions() -> None:
    assert prompt_functions(make()) == []


def test_repeated_requests_share_prepared_functions() -> None:
    first = body_of(make(functions=(SEND, SEARCH)))
    second = body_of(make(functions=(SEND, SEARCH)))
    assert first == second
    assert first["tools"] is second["tools"]  # one shared, read-only list per function set ...
    assert first["tools"][0] is second["tools"][0]  # ... of shared, read-only entries
    counted = prompt_functions(make(functions=(SEND, SEARCH)))
    assert counted is prompt_functions(make(functions=(SEND, SEARCH)))
    assert body_of(make(functions=(SEARCH, SEND)))["tools"] == [first["tools"][1], first["tools"][0]]
    # options that change the result are part of the key
    thoughts = body_of(make(functions=(SEND, SEARCH), config={"put_inner_thoughts_in_kwargs": True}))
    assert "thinking" in thoughts["tools"][0]["function"]["parameters"]["properties"]
    assert "thinking" not in first["tools"][0]["function"]["parameters"]["properties"]
    assert "strict" not in body_of(make(functions=(SEND,)), endpoint=NEBIUS)["tools"][0]["function"]


def test_unconvertible_warning_logged_once_per_distinct_function(caplog: pytest.LogCaptureFixture) -> None:
    free = {"name": "f", "parameters": {"type": "object", "properties": {"m": {"type": "object"}}}}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            body_of(make(functions=(free,)))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_function_caches_evict_the_oldest() -> None:
    cache = openai_request._function_cache(2)
    cache.put(1, 1, 1)
    cache.put(2, 2, 1)
    cache.put(3, 3, 1)
    assert cache.get(1) is None and cache.get(2) == 2 and cache.get(3) == 3 and len(cache) == 2


def test_struct_with_unhashable_required_entries_does_not_crash() -> None:
    """Found by the fuzz test: `required` holding lists or objects is ignored, not a crash."""
    from google.protobuf import struct_pb2

    from server.core.messages import struct_to_dict

    schema = struct_pb2.Struct()
    schema.update(
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": [["a"], {"x": 1}, "a"]}
    )
    assert list(struct_to_dict(schema)["properties"]) == ["a"]
