"""build_chat_body's caches of what comes from the LLMConfig (per config bytes and endpoint) and
of the functions' names (per function set): the same bodies as built from scratch, byte for byte."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core import openai_request
from server.core.openai_request import build_chat_body
from server.core.validation import function_keys
from server.errors import InvalidRequest

OPENAI = "https://api.openai.com/v1"
NEBIUS = "https://api.studio.nebius.com/v1"
LM_STUDIO = "http://127.0.0.1:1234/v1"


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    openai_request.clear_caches()
    yield
    openai_request.clear_caches()


def _function(name: str) -> chat_pb2.FunctionDefinition:
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}})
    return chat_pb2.FunctionDefinition(name=name, description=f"{name} it", parameters=parameters)


def _schema() -> chat_pb2.JsonSchemaFormat:
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 3, "maximum": 9007199254740992.0},
                "past": {"type": "number", "maximum": 9007199254740994.0 * 4, "minimum": -0.0},
                "f": {"type": "number", "multipleOf": 0.1, "exclusiveMaximum": 1e300},
                "s": {"type": "string", "description": 'caf\u00e9 \U0001f600 "q" \\', "enum": ["a", None]},
                "deep": {"type": "array", "items": [{"type": "boolean", "default": False}, [1, [2.5]]]},
            },
            "required": ["n", "s"],
        }
    )
    return chat_pb2.JsonSchemaFormat(name="answer", description="d", schema=schema, strict=False)


_SCHEMA = _schema()

CONFIGS: list[dict[str, Any]] = [
    {"model": "gpt-4o"},
    {"model": "gpt-4o", "temperature": 0.5, "parallel_tool_calls": True, "max_tokens": 100},
    {"model": "o3-mini", "temperature": 0.2, "reasoning_effort": "high"},  # 1.0, no parallel flag
    {"model": "gpt-4o", "top_p": 0.9, "seed": 7, "frequency_penalty": 0.5, "presence_penalty": -0.5},
    {"model": "gpt-4o", "stop": ["END", "STOP"], "temperature": 0.0},
    {
        "model": "gpt-4o",
        "response_format": chat_pb2.ResponseFormat(
            type="json_schema",
            json_schema=chat_pb2.JsonSchemaFormat(name="r", schema=struct_pb2.Struct(), strict=True),
        ),
    },
    {"model": "gpt-4o", "put_inner_thoughts_in_kwargs": True},
    {"model": "qwen", "handle": "llamacpp/qwen", "parallel_tool_calls": False},
    # A schema whose values must come back exactly from the cached JSON: integral and fractional
    # numbers, the exact-int bound and past it, -0.0, unicode, nesting, nulls, with a stop list.
    {
        "model": "gpt-4o",
        "stop": ["\u00e9t\u00e9", "\n\n"],
        "temperature": 0.1,
        "max_tokens": 7,
        "response_format": chat_pb2.ResponseFormat(type="json_schema", json_schema=_SCHEMA),
    },
    {"model": "gpt-4o", "response_format": chat_pb2.ResponseFormat(type="json_object")},
]
REQUESTS: list[dict[str, Any]] = [
    {},
    {"function_call": "auto", "user_id": "u1"},
    {"force_tool_call": "search"},
    {"use_tool_naming": False},
    {"put_inner_thoughts_first": False},
]


def _request(
    config: dict[str, Any], fields: dict[str, Any], names: tuple[str, ...]
) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model_endpoint_type="openai", **config),
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="be brief"),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi"),
        ],
        functions=[_function(name) for name in names],
        **fields,
    )


def _built(request: chat_pb2.CreateRequest, endpoint: str, stream: bool) -> bytes | str:
    try:
        keys = function_keys(request.functions)
        return orjson.dumps(build_chat_body(request, stream=stream, endpoint=endpoint, keys=keys))
    except InvalidRequest as exc:
        return exc.message


def test_cached_bodies_are_the_bodies_built_from_scratch() -> None:
    cases = list(
        itertools.product(
            CONFIGS,
            REQUESTS,
            [("send_message", "search"), ("search",), ()],
            [OPENAI, NEBIUS, LM_STUDIO],
            [False, True],
        )
    )
    fresh = []
    for config, fields, names, endpoint, stream in cases:
        openai_request.clear_caches()
        fresh.append(_built(_request(config, fields, names), endpoint, stream))
    # Then all through warm caches, twice (the second pass hits every entry).
    for _ in range(2):
        for case, expected in zip(cases, fresh, strict=True):
            config, fields, names, endpoint, stream = case
            assert _built(_request(config, fields, names), endpoint, stream) == expected, case
    assert len({body for body in fresh if isinstance(body, bytes)}) > 100  # the cases differ


def test_different_configs_and_endpoints_get_their_own_bodies() -> None:
    def body(config: dict[str, Any], endpoint: str = OPENAI) -> dict[str, Any]:
        request = _request(config, {}, ("search",))
        return build_chat_body(
            request, stream=False, endpoint=endpoint, keys=function_keys(request.functions)
        )

    assert body({"model": "gpt-4o", "temperature": 0.5})["temperature"] == 0.5
    assert body({"model": "gpt-4o", "temperature": 0.7})["temperature"] == 0.7
    assert body({"model": "o3-mini", "temperature": 0.7})["temperature"] == 1.0
    assert "parallel_tool_calls" not in body({"model": "o3-mini", "temperature": 0.7})
    assert body({"model": "o3-mini"})["messages"][0]["role"] == "developer"
    assert body({"model": "gpt-4o"})["messages"][0]["role"] == "system"
    assert body({"model": "gpt-4o"})["tools"][0]["function"]["strict"] is True
    assert "strict" not in body({"model": "gpt-4o"}, NEBIUS)["tools"][0]["function"]
    thoughts = {"model": "gpt-4o", "put_inner_thoughts_in_kwargs": True}
    lm = body(thoughts, LM_STUDIO)["tools"][0]["function"]["parameters"]["properties"]["thinking"]
    other = body(thoughts, OPENAI)["tools"][0]["function"]["parameters"]["properties"]["thinking"]
    assert lm["description"] != other["description"]


def test_a_stop_list_is_a_fresh_list_in_every_body() -> None:
    request = _request({"model": "gpt-4o", "stop": ["END"]}, {}, ())
    first = build_chat_body(request, stream=False, endpoint=OPENAI, keys=())
    first["stop"].append("changed by a caller")
    assert build_chat_body(request, stream=False, endpoint=OPENAI, keys=())["stop"] == ["END"]


def test_a_response_format_is_fresh_in_every_body() -> None:
    request = _request(CONFIGS[-2], {}, ())
    first = build_chat_body(request, stream=False, endpoint=OPENAI, keys=())
    expected = orjson.dumps(first)
    first["response_format"]["json_schema"]["schema"]["properties"]["n"]["minimum"] = 0
    first["stop"].append("changed by a caller")
    again = build_chat_body(request, stream=False, endpoint=OPENAI, keys=())
    assert orjson.dumps(again) == expected
    assert again["response_format"]["json_schema"]["schema"]["properties"]["n"]["minimum"] == 3


def _typed(value: Any) -> Any:
    """`value` with every leaf's type beside it (3 and 3.0, 0.0 and -0.0 differ)."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, repr(value))


def test_a_cached_tail_decodes_to_the_values_built_from_the_config() -> None:
    # What every provider's translation reads: the same keys, order, types and values as the
    # tail built from the proto (before it was cached as JSON), for every config above.
    for config in CONFIGS:
        cfg = _request(config, {}, ()).llm_config
        built: dict[str, Any] = {}
        openai_request._config_tail(cfg, cfg.model, built)
        cached = openai_request.config_body(cfg, OPENAI)
        decoded = dict(cached.tail) if cached.tail is not None else orjson.loads(cached.tail_json or b"{}")
        assert list(decoded) == list(built), config
        assert _typed(decoded) == _typed(built), config


def test_names_are_cached_per_function_set() -> None:
    for names, forced, ok in [
        (("send_message", "search"), "search", True),
        (("send_message",), "search", False),
        (("search", "other"), "other", True),
        (("send_message", "search"), "other", False),
    ]:
        request = _request({"model": "gpt-4o"}, {"force_tool_call": forced}, names)
        built = _built(request, OPENAI, False)
        assert isinstance(built, bytes) is ok, (names, forced, built)


def test_the_config_cache_is_bounded_in_entries_and_in_key_size() -> None:
    size = openai_request._CONFIG_BODIES._max
    for n in range(size + 10):
        request = _request({"model": "gpt-4o", "max_tokens": n + 1}, {}, ())
        assert build_chat_body(request, stream=False, endpoint=OPENAI)["max_completion_tokens"] == n + 1
        assert len(openai_request._CONFIG_BODIES) <= size
    openai_request.clear_caches()
    huge = _request({"model": "gpt-4o", "handle": "h" * 70_000}, {}, ())
    assert huge.llm_config.ByteSize() > openai_request.MAX_CACHED_CONFIG_BYTES
    assert build_chat_body(huge, stream=False, endpoint=OPENAI)["model"] == "gpt-4o"
    long_endpoint = OPENAI + "/" + "a" * openai_request.MAX_CACHED_ENDPOINT_CHARS
    assert build_chat_body(_request({"model": "gpt-4o"}, {}, ()), stream=False, endpoint=long_endpoint)
    assert len(openai_request._CONFIG_BODIES) == 0
    names = openai_request._NAMES._max
    for n in range(names + 10):
        request = _request({"model": "gpt-4o"}, {}, (f"f{n}",))
        body = build_chat_body(request, stream=False, endpoint=OPENAI, keys=function_keys(request.functions))
        assert body["tools"][0]["function"]["name"] == f"f{n}"
        assert len(openai_request._NAMES) <= names
