"""Issue 12, items 10-13 (request semantics): end to end through the real server and real HTTP.

- a tool call cut by `finish_reason: "length"` comes back as the model wrote it, with
  FINISH_REASON_LENGTH (unary and streamed), not as a retryable UPSTREAM_BAD_RESPONSE;
- strict conversion never changes what a function means: the exact `tools` body the fake
  upstream received, one row per schema shape;
- a 404 says whether the model or the path is unknown;
- NaN/Infinity in a schema and a schema nested past protobuf's decode limit are refused, saying
  where and why.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core.openai_request import clear_caches
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, tool_call, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_errors_support import CHAT, call_raw, details, expect


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    # Prepared functions are cached per process; a row must see its own conversion.
    clear_caches()


def schema(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def with_function(
    base_url: str, parameters: dict[str, Any], *, thoughts: bool = False
) -> chat_pb2.CreateRequest:
    req = chat_request(base_url)
    req.llm_config.put_inner_thoughts_in_kwargs = thoughts
    fn = req.functions.add(name="send_message", description="Send a message")
    fn.parameters.CopyFrom(schema(parameters))
    return req


SEND = {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
CUT = '{"thinking": "The user wants a long poem, so I will write one: Roses are red, vio'


# -- item 10: a truncated tool call ---------------------------------------------------------------


async def test_truncated_tool_call_is_returned_with_length_unary(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(json_body=completion(None, tool_calls=[tool_call("send_message", CUT)], finish_reason="length"))
    )
    response = await gateway.chat.Create(with_function(upstream.base_url, SEND, thoughts=True), timeout=10)
    [choice] = response.completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    [call] = choice.message.tool_calls
    assert (call.name, call.arguments) == ("send_message", CUT)
    assert len(upstream.requests) == 1


async def test_truncated_tool_call_is_returned_with_length_streamed(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    fragment = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "send_message"}}
    upstream.script(
        Reply(
            sse=[
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{**fragment, "function": {"name": "send_message", "arguments": ""}}],
                    }
                ),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": CUT[:30]}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": CUT[30:]}}]}),
                chunk({}, finish_reason="length"),
                usage_chunk(),
                "[DONE]",
            ]
        )
    )
    req = with_function(upstream.base_url, SEND, thoughts=True)
    events = [e async for e in gateway.chat.StreamCreate(req, timeout=10)]
    final = events[-1]
    assert final.WhichOneof("event") == "completion"
    [choice] = final.completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert [(c.name, c.arguments) for c in choice.message.tool_calls] == [("send_message", CUT)]
    assert len(upstream.requests) == 1


async def test_cut_arguments_without_length_are_still_a_bad_response(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """Only a length stop explains broken JSON; a 'tool_calls' stop with it is the upstream's fault."""
    upstream.script(
        Reply(
            json_body=completion(
                None, tool_calls=[tool_call("send_message", CUT)], finish_reason="tool_calls"
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(with_function(upstream.base_url, SEND, thoughts=True), timeout=10)
    expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


# -- item 11: strict conversion, on the exact body received ----------------------------------------


def _nest(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        node = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    return node


STRICT_ROWS: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    (
        "optional string becomes nullable",
        {
            "type": "object",
            "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["q"],
        },
        {
            "type": "object",
            "properties": {"q": {"type": "string"}, "n": {"type": ["integer", "null"]}},
            "additionalProperties": False,
            "required": ["q", "n"],
        },
    ),
    (
        "optional enum gets null in its type and its enum",
        {"type": "object", "properties": {"u": {"type": "string", "enum": ["c", "f"]}}},
        {
            "type": "object",
            "properties": {"u": {"type": ["string", "null"], "enum": ["c", "f", None]}},
            "additionalProperties": False,
            "required": ["u"],
        },
    ),
    (
        "optional anyOf gets a null option",
        {
            "type": "object",
            "properties": {"v": {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer"}]}},
        },
        {
            "type": "object",
            "properties": {
                "v": {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer"}, {"type": "null"}]}
            },
            "additionalProperties": False,
            "required": ["v"],
        },
    ),
    (
        "optional nested object is nullable, its own optional property too",
        {
            "type": "object",
            "properties": {
                "o": {
                    "type": "object",
                    "properties": {"x": {"type": "boolean"}, "y": {"type": "string"}},
                    "required": ["y"],
                }
            },
        },
        {
            "type": "object",
            "properties": {
                "o": {
                    "type": ["object", "null"],
                    "properties": {"x": {"type": ["boolean", "null"]}, "y": {"type": "string"}},
                    "additionalProperties": False,
                    "required": ["y", "x"],  # the gateway's key order: required first, then sorted
                }
            },
            "additionalProperties": False,
            "required": ["o"],
        },
    ),
    (
        "optional $ref becomes anyOf with null",
        {
            "type": "object",
            "properties": {"i": {"$ref": "#/$defs/Item"}},
            "$defs": {
                "Item": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
            },
        },
        {
            "type": "object",
            "properties": {"i": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]}},
            "additionalProperties": False,
            "required": ["i"],
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}},
                    "additionalProperties": False,
                    "required": ["id"],
                }
            },
        },
    ),
    # None: the function must go as it was, without `strict`.
    (
        "additionalProperties map is not closed",
        {
            "type": "object",
            "properties": {
                "m": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "additionalProperties": {"type": "string"},
                }
            },
            "required": ["m"],
        },
        None,
    ),
    (
        "additionalProperties true at the root",
        {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "required": ["a"],
            "additionalProperties": True,
        },
        None,
    ),
    (
        "root anyOf is not dropped",
        {
            "type": "object",
            "anyOf": [
                {"properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "string"}}, "required": ["b"]},
            ],
        },
        None,
    ),
    (
        "required names a property that does not exist",
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},
        None,
    ),
    (
        "an unsupported assertion keyword (uniqueItems)",
        {
            "type": "object",
            "properties": {"t": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
            "required": ["t"],
        },
        None,
    ),
    (
        "a $ref to nothing in the schema",
        {"type": "object", "properties": {"i": {"$ref": "#/$defs/Missing"}}, "required": ["i"]},
        None,
    ),
    (
        "a $ref with sibling constraints",
        {
            "type": "object",
            "properties": {"i": {"$ref": "#/$defs/S", "maxLength": 3}},
            "required": ["i"],
            "$defs": {"S": {"type": "string"}},
        },
        None,
    ),
    (
        "more than 1000 enum values",
        {
            "type": "object",
            "properties": {"e": {"type": "string", "enum": [f"v{i}" for i in range(1001)]}},
            "required": ["e"],
        },
        None,
    ),
    # The root plus 10 nested objects is 11 levels (OpenAI allows 10).
    ("nested deeper than 10 object levels", _nest(11), None),
]


@pytest.mark.parametrize(("case", "parameters", "expected"), STRICT_ROWS, ids=[r[0] for r in STRICT_ROWS])
async def test_strict_conversion_is_faithful_or_off(
    gateway: RunningGateway,
    upstream: FakeUpstream,
    case: str,
    parameters: dict[str, Any],
    expected: dict[str, Any] | None,
) -> None:
    await gateway.chat.Create(with_function(upstream.base_url, parameters), timeout=10)
    [tool] = upstream.requests[0].body["tools"]
    function = tool["function"]
    if expected is None:
        assert "strict" not in function, case
        # Sent as given: the Struct round trip keeps the content (key order aside; ints as ints).
        assert function["parameters"] == parameters
    else:
        assert function["strict"] is True
        assert function["parameters"] == expected


async def test_one_function_off_strict_leaves_the_others_strict(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    req = with_function(upstream.base_url, SEND)
    other = req.functions.add(name="put", description="Put a map")
    free = {
        "type": "object",
        "properties": {"m": {"type": "object", "additionalProperties": True}},
        "required": ["m"],
    }
    other.parameters.CopyFrom(schema(free))
    await gateway.chat.Create(req, timeout=10)
    tools = upstream.requests[0].body["tools"]
    assert tools[0]["function"]["strict"] is True
    assert "strict" not in tools[1]["function"]
    assert tools[1]["function"]["parameters"] == free


# -- item 12: a 404 says what was not found ---------------------------------------------------------

NOT_FOUND_ROWS: list[tuple[str, Reply, str, str]] = [
    (
        "openai model_not_found",
        Reply(
            status=404,
            json_body={
                "error": {
                    "message": "The model `gpt-x` does not exist or you do not have access to it.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            },
        ),
        "MODEL_NOT_FOUND",
        "model",
    ),
    (
        "ollama model not found",
        Reply(status=404, json_body={"error": 'model "llama3.1:8b" not found, try pulling it first'}),
        "MODEL_NOT_FOUND",
        "model",
    ),
    (
        "vllm model does not exist",
        Reply(
            status=404,
            json_body={
                "object": "error",
                "message": "The model `foo` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            },
        ),
        "MODEL_NOT_FOUND",
        "model",
    ),
    (
        "ollama without /v1: Go's bare 404",
        Reply(status=404, raw=b"404 page not found"),
        "NOT_FOUND",
        "endpoint",
    ),
    (
        "vllm without /v1: FastAPI's 404",
        Reply(status=404, json_body={"detail": "Not Found"}),
        "NOT_FOUND",
        "endpoint",
    ),
    ("an empty 404", Reply(status=404, raw=b""), "NOT_FOUND", "endpoint"),
    (
        "an HTML 404 page",
        Reply(
            status=404,
            raw=b"<html><head><title>404 Not Found</title></head></html>",
            content_type="text/html",
        ),
        "NOT_FOUND",
        "endpoint",
    ),
]


@pytest.mark.parametrize(
    ("case", "reply", "reason", "missing"), NOT_FOUND_ROWS, ids=[r[0] for r in NOT_FOUND_ROWS]
)
async def test_404_says_whether_the_model_or_the_path_is_unknown(
    gateway: RunningGateway, upstream: FakeUpstream, case: str, reply: Reply, reason: str, missing: str
) -> None:
    upstream.script(reply)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    d = expect(info.value, grpc.StatusCode.NOT_FOUND, reason)
    assert d.metadata["http_status"] == "404"
    assert d.metadata["not_found"] == missing
    if missing == "endpoint":
        assert "/v1" in d.message and "base URL" in d.message
        assert "/v1" in d.metadata["hint"]
    else:
        assert "hint" not in d.metadata
    assert len(upstream.requests) == 1


# -- item 13: NaN/Infinity, and nesting past protobuf's limit --------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
async def test_non_finite_numbers_in_a_schema_are_refused(
    gateway: RunningGateway, upstream: FakeUpstream, bad: float
) -> None:
    params = {"type": "object", "properties": {"n": {"type": "number", "maximum": bad}}, "required": ["n"]}
    req = with_function(upstream.base_url, params)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(req, timeout=10)
    d = expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    field = "functions[0].parameters.properties.n.maximum"
    assert field in d.violations
    assert "send_message" in d.violations[field]
    assert "finite" in d.violations[field]
    assert upstream.requests == []


def _nested_objects(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(levels - 1):
        node = {"a": node}
    return node


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate", "CountTokens"])
async def test_a_schema_past_the_decode_nesting_limit_says_so(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    # 33 nested JSON objects (the parameters object counts) decode; 34 exceed upb's 100 levels.
    ok = with_function(upstream.base_url, _nested_objects(33))
    chat_pb2.CreateRequest.FromString(ok.SerializeToString())
    deep = with_function(upstream.base_url, _nested_objects(34))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, CHAT + rpc, deep.SerializeToString())
    d = details(info.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert "nest" in d.message and "100" in d.message and "33" in d.message
    assert d.metadata["max_message_depth"] == "100"
    assert d.metadata["max_schema_object_depth"] == "33"
    assert "functions[].parameters" in d.violations
    assert upstream.requests == []


# -- same class: a tool argument the inner-thoughts option would swallow ---------------------------


@pytest.mark.parametrize("name", ["thinking", "inner_thoughts"])
async def test_a_tool_argument_named_like_the_inner_thoughts_is_refused(
    gateway: RunningGateway, upstream: FakeUpstream, name: str
) -> None:
    """Inner thoughts would replace the tool's own argument and pop it from every answer."""
    params = {"type": "object", "properties": {name: {"type": "integer"}, "q": {"type": "string"}}}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(with_function(upstream.base_url, params, thoughts=True), timeout=10)
    d = expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    field = f"functions[0].parameters.properties.{name}"
    assert "put_inner_thoughts_in_kwargs" in d.violations[field]
    assert upstream.requests == []
    # Without the option the argument is the tool's own and is sent as it is.
    await gateway.chat.Create(with_function(upstream.base_url, params), timeout=10)
    assert name in upstream.requests[0].body["tools"][0]["function"]["parameters"]["properties"]
