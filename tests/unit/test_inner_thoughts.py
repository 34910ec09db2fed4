"""Inner thoughts in kwargs: injection into the sent functions and unpacking of the answer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.core import openai_request
from server.core.inner_thoughts import (
    INNER_THOUGHTS_DESCRIPTION,
    INNER_THOUGHTS_DESCRIPTION_GO_FIRST,
    add_inner_thoughts,
    unpack_inner_thoughts,
)
from server.core.openai_request import build_chat_body, prompt_functions, unpack_completion
from server.errors import UpstreamBadResponse
from server.providers.local.functions import specs_for_prompt
from server.providers.local.wrappers import render_prompt

OPENAI = "https://api.openai.com/v1"
LM_STUDIO = "http://localhost:1234/v1"
GO_FIRST = (
    "Deep inner monologue private to you only. Think before you act, so always generate arg "
    "'thinking' first before any other arg."
)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    openai_request.clear_caches()
    yield
    openai_request.clear_caches()


def request(
    *, first: bool | None = None, kwargs: bool = True, endpoint: str = OPENAI
) -> chat_pb2.CreateRequest:
    req = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o", model_endpoint=endpoint, put_inner_thoughts_in_kwargs=kwargs
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
        functions=[
            chat_pb2.FunctionDefinition(
                name="send_message",
                description="Sends a message.",
                parameters={
                    "type": "object",
                    "properties": {"message": {"type": "string", "description": "text"}},
                    "required": ["message"],
                },
            )
        ],
    )
    if first is not None:
        req.put_inner_thoughts_first = first
    return req


def test_constants_match_the_seed() -> None:
    assert INNER_THOUGHTS_DESCRIPTION == "Deep inner monologue private to you only."
    assert INNER_THOUGHTS_DESCRIPTION_GO_FIRST == GO_FIRST


@pytest.mark.parametrize(
    ("first", "endpoint", "order", "description"),
    [
        (None, OPENAI, ["thinking", "message"], INNER_THOUGHTS_DESCRIPTION),
        (True, OPENAI, ["thinking", "message"], INNER_THOUGHTS_DESCRIPTION),
        (False, OPENAI, ["message", "thinking"], INNER_THOUGHTS_DESCRIPTION),
        (None, LM_STUDIO, ["thinking", "message"], GO_FIRST),
        (False, LM_STUDIO, ["message", "thinking"], GO_FIRST),
    ],
)
def test_injection_in_sent_tools(
    first: bool | None, endpoint: str, order: list[str], description: str
) -> None:
    body = build_chat_body(request(first=first, endpoint=endpoint), stream=False, endpoint=endpoint)
    thinking = {"type": "string", "description": description}
    message = {"type": "string", "description": "text"}
    props = {"thinking": thinking, "message": message}
    expected_tool = {
        "type": "function",
        "function": {
            "name": "send_message",
            "description": "Sends a message.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {k: props[k] for k in order},
                "additionalProperties": False,
                "required": order,
            },
        },
    }
    # Byte-exact: key order is part of what is sent.
    assert orjson.dumps(body["tools"]) == orjson.dumps([expected_tool])

    # Counted form: Struct keys come back sorted (see server.core.messages), the injected
    # `thinking` property is ours.
    counted = prompt_functions(request(first=first, endpoint=endpoint))
    props["message"] = {"description": "text", "type": "string"}
    assert orjson.dumps(counted) == orjson.dumps(
        [
            {
                "name": "send_message",
                "description": "Sends a message.",
                "parameters": {
                    "properties": {k: props[k] for k in order},
                    "required": order,
                    "type": "object",
                },
            }
        ]
    )


def test_no_injection_when_off() -> None:
    body = build_chat_body(request(kwargs=False), stream=False, endpoint=OPENAI)
    assert list(body["tools"][0]["function"]["parameters"]["properties"]) == ["message"]
    assert list(prompt_functions(request(kwargs=False))[0]["parameters"]["properties"]) == ["message"]


def test_injection_in_legacy_functions() -> None:
    req = request()
    req.use_tool_naming = False
    body = build_chat_body(req, stream=False, endpoint=OPENAI)
    assert list(body["functions"][0]["parameters"]["properties"]) == ["thinking", "message"]
    assert body["functions"][0]["parameters"]["required"] == ["thinking", "message"]


def test_add_inner_thoughts_replaces_a_caller_thinking_property_and_keeps_input() -> None:
    source = {
        "name": "f",
        "description": "",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "thinking": {"type": "integer"}},
            "required": ["a", "thinking"],
        },
    }
    snapshot = orjson.dumps(source)
    out = add_inner_thoughts(source, first=False, description="d")
    assert orjson.dumps(source) == snapshot
    assert out["parameters"] == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "thinking": {"type": "string", "description": "d"}},
        "required": ["a", "thinking"],
    }


@pytest.mark.parametrize("first", [True, False])
def test_a_caller_thinking_property_is_replaced_on_both_paths(first: bool) -> None:
    """One injection, one rule: the OpenAI-compatible body and the local prompt both replace a
    caller's own `thinking` (unpacking pops it from the answer on both paths anyway)."""
    parameters = {
        "type": "object",
        "properties": {"message": {"type": "string"}, "thinking": {"type": "integer"}},
        "required": ["message"],
    }
    expected_props = ["thinking", "message"] if first else ["message", "thinking"]
    req = request(first=first)
    del req.functions[:]
    req.functions.add(name="send_message", description="Sends a message.", parameters=parameters)
    sent = build_chat_body(req, stream=False, endpoint=OPENAI)["tools"][0]["function"]["parameters"]
    assert list(sent["properties"]) == expected_props
    assert sent["properties"]["thinking"]["type"] == "string"
    assert sent["required"] == expected_props

    fn = {"name": "send_message", "description": "Sends a message.", "parameters": parameters}
    (spec,) = specs_for_prompt([fn], put_inner_thoughts_in_kwargs=True, put_inner_thoughts_first=first)
    assert list(spec.properties) == expected_props
    assert spec.properties["thinking"] == {"type": "string", "description": INNER_THOUGHTS_DESCRIPTION}
    assert spec.required == expected_props
    prompt = render_prompt(
        "chatml",
        [{"role": "user", "content": "hi"}],
        [fn],
        first_message=False,
        put_inner_thoughts_in_kwargs=True,
        put_inner_thoughts_first=first,
    )
    assert f"    thinking (string, required): {INNER_THOUGHTS_DESCRIPTION}" in prompt
    assert "thinking (integer" not in prompt
    assert fn["parameters"] is parameters and parameters["properties"]["thinking"] == {"type": "integer"}


# -- unpacking ---------------------------------------------------------------------------------


def call(args: Any, name: str = "send_message", id_: str = "call_1") -> dict[str, Any]:
    text = args if isinstance(args, str) else orjson.dumps(args).decode()
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": text}}


def completion(*messages: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", **m}, "finish_reason": "tool_calls"}
            for i, m in enumerate(messages)
        ],
    }


def test_unpack_every_call_of_every_choice() -> None:
    body = completion(
        {
            "content": None,
            "tool_calls": [
                call({"thinking": "first thought", "message": "a"}),
                call({"query": "q", "thinking": "second"}, name="search", id_="call_2"),
            ],
        },
        {"content": None, "tool_calls": [call({"thinking": "other choice", "message": "b"})]},
    )
    unpack_completion(body, request())
    m0 = body["choices"][0]["message"]
    assert m0["content"] == "first thought\nsecond"
    assert [tc["function"]["arguments"] for tc in m0["tool_calls"]] == ['{"message":"a"}', '{"query":"q"}']
    assert [tc["id"] for tc in m0["tool_calls"]] == ["call_1", "call_2"]
    m1 = body["choices"][1]["message"]
    assert m1["content"] == "other choice"
    assert m1["tool_calls"][0]["function"]["arguments"] == '{"message":"b"}'


def test_unpack_older_kwarg_name() -> None:
    body = completion({"content": None, "tool_calls": [call({"inner_thoughts": "old", "message": "a"})]})
    unpack_inner_thoughts(body)
    message = body["choices"][0]["message"]
    assert message["content"] == "old"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"message":"a"}'


def test_unpack_both_names_prefers_thinking_and_removes_both() -> None:
    body = completion({"tool_calls": [call({"inner_thoughts": "old", "thinking": "new", "x": 1})]})
    unpack_inner_thoughts(body)
    message = body["choices"][0]["message"]
    assert message["content"] == "new"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"x":1}'


def test_unpack_legacy_function_call() -> None:
    body = completion(
        {"content": None, "function_call": {"name": "f", "arguments": '{"thinking": "t", "a": 1}'}}
    )
    unpack_inner_thoughts(body)
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "t",
        "function_call": {"name": "f", "arguments": '{"a":1}'},
    }


def test_missing_kwarg_warns_and_leaves_the_call(caplog: pytest.LogCaptureFixture) -> None:
    original = '{"message": "a"}'
    body = completion(
        {"content": None, "tool_calls": [call(original), call({"thinking": "t", "q": 1}, id_="call_2")]}
    )
    with caplog.at_level(logging.WARNING, logger="server.core.inner_thoughts"):
        unpack_inner_thoughts(body)
    message = body["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["arguments"] == original  # untouched text
    assert message["content"] == "t"
    [record] = caplog.records
    assert "choice 0, tool call 0 (send_message)" in record.getMessage()


def test_no_thoughts_at_all_keeps_content(caplog: pytest.LogCaptureFixture) -> None:
    body = completion({"content": "hello", "tool_calls": [call({"message": "a"})]})
    with caplog.at_level(logging.WARNING, logger="server.core.inner_thoughts"):
        unpack_inner_thoughts(body)
    assert body["choices"][0]["message"]["content"] == "hello"
    assert len(caplog.records) == 1


def test_existing_content_is_overwritten_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    body = completion({"content": "visible", "tool_calls": [call({"thinking": "t", "message": "a"})]})
    with caplog.at_level(logging.WARNING, logger="server.core.inner_thoughts"):
        unpack_inner_thoughts(body)
    assert body["choices"][0]["message"]["content"] == "t"
    [record] = caplog.records
    assert "overwritten" in record.getMessage()
    assert "visible" not in record.getMessage()  # content is not logged


def test_text_only_choice_untouched(caplog: pytest.LogCaptureFixture) -> None:
    body = completion({"content": "just text"})
    with caplog.at_level(logging.WARNING, logger="server.core.inner_thoughts"):
        unpack_inner_thoughts(body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "just text"}
    assert caplog.records == []


@pytest.mark.parametrize(
    "arguments",
    ['{"thinking": "t", "message": ', "", "not json"],
)
def test_non_json_arguments_are_a_bad_response(arguments: str) -> None:
    body = completion(
        {"tool_calls": [call({"thinking": "t"})]},
        {"tool_calls": [call({"thinking": "ok"}), call(arguments, id_="call_2")]},
    )
    with pytest.raises(UpstreamBadResponse) as info:
        unpack_completion(body, request())
    err = info.value
    assert err.reason == "UPSTREAM_BAD_RESPONSE"
    assert err.metadata == {"choice_index": "1", "tool_call_index": "1", "function_name": "send_message"}
    assert "not valid JSON" in err.message


def test_missing_arguments_are_a_bad_response() -> None:
    body = completion({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]})
    with pytest.raises(UpstreamBadResponse):
        unpack_inner_thoughts(body)


def test_non_object_json_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    body = completion({"content": None, "tool_calls": [call("[1, 2]")]})
    with caplog.at_level(logging.WARNING, logger="server.core.inner_thoughts"):
        unpack_inner_thoughts(body)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "[1, 2]"
    assert len(caplog.records) == 1


def test_non_string_thought_is_serialized() -> None:
    body = completion({"tool_calls": [call({"thinking": {"step": 1}, "m": "a"})]})
    unpack_inner_thoughts(body)
    assert body["choices"][0]["message"]["content"] == '{"step":1}'


def test_unpack_completion_does_nothing_when_off() -> None:
    body = completion({"content": None, "tool_calls": [call({"thinking": "t", "message": "a"})]})
    snapshot = orjson.dumps(body)
    unpack_completion(body, request(kwargs=False))
    assert orjson.dumps(body) == snapshot


def test_choices_not_a_list_is_a_bad_response() -> None:
    with pytest.raises(UpstreamBadResponse):
        unpack_inner_thoughts({"choices": {"0": {}}})


def test_no_choices_is_left_to_the_caller() -> None:
    body: dict[str, Any] = {"choices": []}
    unpack_inner_thoughts(body)
    unpack_inner_thoughts({})
    assert body == {"choices": []}
