"""Review of issue 12 items 10-13: a strict tool's answer means what the caller's schema means.

Strict conversion makes an optional property required and nullable, so the model writes `null`
where it would have left the argument out. On the way back (unary completion and the stream's
final completion) the gateway drops exactly those nulls, at every level, arrays of objects
included, and keeps the nulls the caller's own schema allowed. Deltas relay the raw text.
Everything here goes through the real gateway and a real HTTP fake upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core.openai_request import clear_caches
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, tool_call, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    clear_caches()


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string"},
        "cc": {"type": "string"},  # optional: made nullable, its null means absent
        "reply_to": {"type": ["string", "null"]},  # optional, nullable already: a real null
        "priority": {"type": "integer", "nullable": True},  # required, OpenAPI-nullable: real
        "attachments": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "size": {"type": "integer"},  # optional inside array items
                    "note": {"type": ["string", "null"]},  # optional, nullable already
                },
                "required": ["name"],
            },
        },
        "meta": {
            "type": "object",
            "properties": {"tag": {"type": "string", "enum": ["a", "b"]}},
            "required": [],
        },
    },
    "required": ["to", "priority"],
}

# What a model answering the strict schema writes (OpenAI's compact form), every key present.
RAW = (
    '{"to":"bob","cc":null,"reply_to":null,"priority":null,'
    '"attachments":[{"name":"a.txt","size":null,"note":null},{"name":"b","size":3,"note":"x"}],'
    '"meta":{"tag":null}}'
)
# What the caller's tool means: made-nullable nulls absent, its own nulls kept.
FAITHFUL = {
    "to": "bob",
    "reply_to": None,
    "priority": None,
    "attachments": [{"name": "a.txt", "note": None}, {"name": "b", "size": 3, "note": "x"}],
    "meta": {},
}


def request_for(
    base_url: str, parameters: dict[str, Any], *, thoughts: bool = False
) -> chat_pb2.CreateRequest:
    req = chat_request(base_url)
    req.llm_config.put_inner_thoughts_in_kwargs = thoughts
    fn = req.functions.add(name="send_message", description="Send a message")
    s = struct_pb2.Struct()
    s.update(parameters)
    fn.parameters.CopyFrom(s)
    return req


def sse_for(arguments: str, *, finish_reason: str = "tool_calls") -> list[dict[str, Any] | str]:
    first = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "send_message", "arguments": ""},
    }
    cut = len(arguments) // 2
    return [
        chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:cut]}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[cut:]}}]}),
        chunk({}, finish_reason=finish_reason),
        usage_chunk(),
        "[DONE]",
    ]


def sent_parameters(upstream: FakeUpstream) -> dict[str, Any]:
    [tool] = upstream.requests[-1].body["tools"]
    assert tool["function"]["strict"] is True
    params: dict[str, Any] = tool["function"]["parameters"]
    return params


async def test_unary_answer_drops_the_nulls_strict_mode_added(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", RAW)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, SCHEMA), timeout=10)
    # The model was asked for the nullable form...
    params = sent_parameters(upstream)
    assert params["properties"]["cc"]["type"] == ["string", "null"]
    assert params["properties"]["meta"]["properties"]["tag"]["enum"] == ["a", "b", None]
    # ...and the tool gets what its own schema means.
    [call] = response.completion.choices[0].message.tool_calls
    assert json.loads(call.arguments) == FAITHFUL


async def test_stream_final_completion_drops_them_and_deltas_stay_raw(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=sse_for(RAW)))
    events = [e async for e in gateway.chat.StreamCreate(request_for(upstream.base_url, SCHEMA), timeout=10)]
    relayed = "".join(
        tc.arguments for e in events if e.WhichOneof("event") == "delta" for tc in e.delta.tool_calls
    )
    assert relayed == RAW  # deltas relay the model's text as written
    final = events[-1]
    assert final.WhichOneof("event") == "completion"
    [call] = final.completion.choices[0].message.tool_calls
    assert json.loads(call.arguments) == FAITHFUL


async def test_with_inner_thoughts_both_are_undone(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    raw = '{"thinking":"Send it.",' + RAW[1:]
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", raw)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, SCHEMA, thoughts=True), timeout=10)
    [choice] = response.completion.choices
    assert choice.message.content == "Send it."
    assert json.loads(choice.message.tool_calls[0].arguments) == FAITHFUL


async def test_ref_definitions_and_anyof_objects(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    schema = {
        "type": "object",
        "properties": {
            "who": {"$ref": "#/$defs/person"},
            "where": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["city"],
                    },
                    {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                        "required": ["lat", "lon"],
                    },
                ]
            },
            "maybe": {"$ref": "#/$defs/nullable_name"},
        },
        "required": ["who", "where"],
        "$defs": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "boss": {"$ref": "#/$defs/person"}},
                "required": ["name"],
            },
            "nullable_name": {"type": ["string", "null"]},
        },
    }
    raw = (
        '{"who":{"name":"a","boss":{"name":"b","boss":null}},"where":{"city":"Oslo","zip":null},"maybe":null}'
    )
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", raw)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, schema), timeout=10)
    [call] = response.completion.choices[0].message.tool_calls
    # `maybe`'s definition accepts null: the model's null there is the caller's null.
    assert json.loads(call.arguments) == {
        "who": {"name": "a", "boss": {"name": "b"}},
        "where": {"city": "Oslo"},
        "maybe": None,
    }


async def test_nothing_made_nullable_leaves_the_text_as_written(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    schema = {
        "type": "object",
        "properties": {"to": {"type": "string"}, "cc": {"type": ["string", "null"]}},
        "required": ["to", "cc"],
    }
    raw = '{ "to": "bob",  "cc": null }'
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", raw)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, schema), timeout=10)
    assert response.completion.choices[0].message.tool_calls[0].arguments == raw


async def test_truncated_call_keeps_its_text(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    cut = RAW[:40]
    upstream.script(Reply(sse=sse_for(cut, finish_reason="length")))
    events = [e async for e in gateway.chat.StreamCreate(request_for(upstream.base_url, SCHEMA), timeout=10)]
    [choice] = events[-1].completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert choice.message.tool_calls[0].arguments == cut


@pytest.mark.parametrize(
    "prop",
    [{"type": {"kind": "string"}}, {"type": [["string"]]}],
    ids=["type-object", "type-list-of-lists"],
)
async def test_a_malformed_type_goes_non_strict_not_internal(
    gateway: RunningGateway, upstream: FakeUpstream, prop: dict[str, Any]
) -> None:
    """The converter raised TypeError on these (validation lets them through): INTERNAL."""
    schema = {"type": "object", "properties": {"a": prop}}
    req = request_for(upstream.base_url, schema)
    req.function_call = "auto"  # a text answer is then an answer (under "required" it is not)
    response = await gateway.chat.Create(req, timeout=10)
    assert response.completion.choices[0].message.content == "Hello!"
    [tool] = upstream.requests[-1].body["tools"]
    assert "strict" not in tool["function"]
    assert tool["function"]["parameters"] == schema


@pytest.mark.parametrize(("depth", "leaf"), [(300, "1"), (300, "1.5"), (900, "1")])
async def test_deeply_nested_arguments_with_inner_thoughts_are_not_internal(
    gateway: RunningGateway, upstream: FakeUpstream, depth: int, leaf: str
) -> None:
    """orjson reads 1,024 levels but writes only 255 (TypeError), and the float scan recursed
    (RecursionError): a model's deep, valid arguments ended in INTERNAL once the thoughts were
    popped."""
    schema = {"type": "object", "properties": {"data": {"type": "array", "items": {}}}, "required": ["data"]}
    inner = "[" * depth + leaf + "]" * depth
    raw = '{"thinking":"deep","data":' + inner + "}"
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", raw)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, schema, thoughts=True), timeout=10)
    [choice] = response.completion.choices
    assert choice.message.content == "deep"
    assert choice.message.tool_calls[0].arguments == '{"data":' + inner + "}"


async def test_arguments_too_deep_to_rewrite_come_back_as_written(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    schema = {"type": "object", "properties": {"data": {"type": "array", "items": {}}}, "required": ["data"]}
    raw = '{"thinking":"deep","data":' + "[" * 1020 + "1.5" + "]" * 1020 + "}"
    upstream.script(Reply(json_body=completion(None, tool_calls=[tool_call("send_message", raw)])))
    response = await gateway.chat.Create(request_for(upstream.base_url, schema, thoughts=True), timeout=10)
    [choice] = response.completion.choices
    call = choice.message.tool_calls[0]
    # Unpacked, or (past what Python's json writes) the model's text untouched: never INTERNAL.
    assert (choice.message.content, call.arguments) in (
        ("deep", raw.replace('"thinking":"deep",', "")),
        ("", raw),
    )


# -- item 10, attacked: several choices, valid JSON at a length stop, no call ---------------------

SEND = {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}


async def test_length_choices_are_judged_one_by_one(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    whole = '{"thinking":"ok","message":"hi"}'
    cut = '{"thinking":"I will wri'
    body = completion(None, tool_calls=[tool_call("send_message", whole)], finish_reason="length")
    second = {
        "index": 1,
        "message": {"role": "assistant", "content": None, "tool_calls": [tool_call("send_message", cut)]},
        "logprobs": None,
        "finish_reason": "length",
    }
    third = {
        "index": 2,
        "message": {"role": "assistant", "content": "Roses are red, vio"},
        "logprobs": None,
        "finish_reason": "length",
    }
    body["choices"] += [second, third]
    upstream.script(Reply(json_body=body))
    response = await gateway.chat.Create(request_for(upstream.base_url, SEND, thoughts=True), timeout=10)
    a, b, c = response.completion.choices
    # valid JSON at a length stop: a complete call, unpacked as any other
    assert (a.finish_reason, a.message.content, a.message.tool_calls[0].arguments) == (
        chat_pb2.FINISH_REASON_LENGTH,
        "ok",
        '{"message":"hi"}',
    )
    # cut: as written, content untouched
    assert (b.finish_reason, b.message.content, b.message.tool_calls[0].arguments) == (
        chat_pb2.FINISH_REASON_LENGTH,
        "",
        cut,
    )
    assert (c.finish_reason, c.message.content, list(c.message.tool_calls)) == (
        chat_pb2.FINISH_REASON_LENGTH,
        "Roses are red, vio",
        [],
    )


async def test_stream_cut_in_the_second_of_two_calls(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    def start(i: int) -> dict[str, Any]:
        return {
            "index": i,
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "send_message", "arguments": ""},
        }

    upstream.script(
        Reply(
            sse=[
                chunk({"role": "assistant", "content": None, "tool_calls": [start(0)]}),
                chunk(
                    {
                        "tool_calls": [
                            {"index": 0, "function": {"arguments": '{"thinking":"a","message":"x"}'}}
                        ]
                    }
                ),
                chunk({"tool_calls": [start(1)]}),
                chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"thinking":"b","mess'}}]}),
                chunk({}, finish_reason="length"),
                usage_chunk(),
                "[DONE]",
            ]
        )
    )
    events = [
        e
        async for e in gateway.chat.StreamCreate(
            request_for(upstream.base_url, SEND, thoughts=True), timeout=10
        )
    ]
    [choice] = events[-1].completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert choice.message.content == "a"
    assert [c.arguments for c in choice.message.tool_calls] == ['{"message":"x"}', '{"thinking":"b","mess']
