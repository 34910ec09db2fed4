"""Review of issue 12 item 11: the strict converter on hostile schemas, and the way back.

- schemas a Struct can carry that crashed the converter (a TypeError, so a request failing
  INTERNAL) are sent non-strict instead;
- an optional `type: [x, "null"]` with an `enum` lacking null was forced to a value;
- `restore_absent`: the nulls strict mode added are dropped, exactly those, at every level,
  never a null the caller's schema allowed, never a hang or a stack overflow, numbers exact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server.core.openai_request import build_chat_body, clear_caches, unpack_completion
from server.core.strict_schema import (
    UnsupportedSchema,
    convert_function,
    restore_absent,
    strict_or_unchanged,
    to_strict_function,
)


def fn(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required is not None:
        params["required"] = required
    return {"name": "f", "description": "d", "parameters": params}


# -- schemas that crashed the converter -----------------------------------------------------------


@pytest.mark.parametrize(
    "prop",
    [
        {"type": [["string"]]},  # a list inside `type` (unhashable)
        {"type": {"string": True}},  # an object as `type`
        {"type": 1.0},  # a number as `type`
        {"type": []},  # no type at all
        {"anyOf": [{"type": {"a": 1}}, {"type": "string"}]},
        {"anyOf": [{"type": [{"a": 1}]}, {"type": "string"}]},  # an object inside an option's type list
    ],
)
def test_a_malformed_type_is_unsupported_not_a_crash(prop: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchema):
        to_strict_function(fn({"a": prop}))
    source = fn({"a": prop})
    assert strict_or_unchanged(source) is source


def test_an_unforeseen_converter_error_sends_the_function_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a converter bug costs strict mode for one function, not an INTERNAL."""
    import server.core.strict_schema as strict_schema

    def broken(schema: Any, path: str, walk: Any, depth: int) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr(strict_schema, "_node", broken)
    source = fn({"a": {"type": "string"}})
    assert strict_or_unchanged(source) is source


@pytest.mark.parametrize("required", [[["a"]], [{"a": 1}], [1]])
def test_required_with_non_names_is_unsupported_not_a_crash(required: list[Any]) -> None:
    source = fn({"a": {"type": "string"}}, required)
    assert strict_or_unchanged(source) is source


def test_optional_nullable_type_with_an_enum_without_null_may_still_be_absent() -> None:
    """`type: [string, null]` + `enum: [a, b]` never accepted null: as a required strict
    property the model had to pick a or b for an argument the caller left optional."""
    out = to_strict_function(fn({"mode": {"type": ["string", "null"], "enum": ["a", "b"]}}))
    assert out["parameters"]["properties"]["mode"] == {"type": ["string", "null"], "enum": ["a", "b", None]}


# -- the way back ----------------------------------------------------------------------------------


def answer(arguments: str, name: str = "f", finish_reason: str = "tool_calls") -> dict[str, Any]:
    call = {"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}


def restored(function: dict[str, Any], arguments: str) -> str:
    strict, restore = convert_function(function)
    body = answer(arguments)
    if restore is not None:
        restore_absent(body, {"f": restore})
    text: str = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    return text


def test_no_property_made_nullable_means_no_restore() -> None:
    _, restore = convert_function(fn({"a": {"type": "string"}, "b": {"type": ["integer", "null"]}}, ["a"]))
    assert restore is None  # b was nullable already: nothing to undo, nothing to walk


def test_anyof_with_two_options_of_the_same_keys_is_left_alone() -> None:
    """Option 1 made `x` nullable, option 2 allows null itself: a null x is ambiguous."""
    f = fn(
        {
            "v": {
                "anyOf": [
                    {"type": "object", "properties": {"x": {"type": "string"}}},
                    {"type": "object", "properties": {"x": {"type": ["string", "null"]}}, "required": ["x"]},
                ]
            }
        },
        ["v"],
    )
    assert json.loads(restored(f, '{"v":{"x":null}}')) == {"v": {"x": None}}


def test_anyof_object_option_picked_by_its_keys() -> None:
    f = fn(
        {
            "v": {
                "anyOf": [
                    {"type": "object", "properties": {"x": {"type": "string"}}},
                    {"type": "object", "properties": {"y": {"type": ["string", "null"]}}, "required": ["y"]},
                ]
            }
        },
        ["v"],
    )
    assert json.loads(restored(f, '{"v":{"x":null}}')) == {"v": {}}
    assert json.loads(restored(f, '{"v":{"y":null}}')) == {"v": {"y": None}}


def test_const_and_enum_with_null() -> None:
    f = fn(
        {
            "c": {"type": "string", "const": "x"},
            "e": {"type": "string", "enum": ["a", None]},  # type says string: null is new
            "n": {"type": ["string", "null"], "enum": ["a", None]},  # a real null
        }
    )
    assert json.loads(restored(f, '{"c":null,"e":null,"n":null}')) == {"n": None}


def test_a_definition_that_is_only_a_ref_to_itself_does_not_hang() -> None:
    f = fn(
        {"a": {"$ref": "#/$defs/A"}, "b": {"type": "string"}},
        ["a"],
        **{"$defs": {"A": {"$ref": "#/$defs/A"}}},
    )
    assert json.loads(restored(f, '{"a":{"z":null},"b":null}')) == {"a": {"z": None}}


def test_a_deep_answer_through_a_ref_cycle_does_not_overflow() -> None:
    f = fn({"next": {"$ref": "#"}, "v": {"type": "string"}})
    text = '{"v":null,"next":' * 900 + "null" + "}" * 900
    out = json.loads(restored(f, text))
    assert "v" not in out and "v" not in out["next"]  # the top levels are restored


def test_numbers_stay_exact() -> None:
    f = fn({"n": {"type": "integer"}, "x": {"type": "number"}, "s": {"type": "string"}}, ["n", "x"])
    big = "123456789012345678901234567890"
    assert restored(f, '{"n":' + big + ',"x":0.1,"s":null}') == '{"n":' + big + ',"x":0.1}'


def test_arguments_that_are_not_an_object_are_left_as_written() -> None:
    f = fn({"s": {"type": "string"}})
    for text in ('{"s":nul', "null", "[null]", '"null"'):
        assert restored(f, text) == text


def test_only_the_named_function_is_restored() -> None:
    _, restore = convert_function(fn({"s": {"type": "string"}}))
    assert restore is not None
    body = answer('{"s":null}', name="other")
    restore_absent(body, {"f": restore})
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"s":null}'


def test_the_restore_is_cached_with_the_function_list() -> None:
    clear_caches()
    req = chat_pb2.CreateRequest()
    req.llm_config.model = "gpt-4o-mini"
    req.messages.add(role=chat_pb2.ROLE_USER, content="hi")
    f = req.functions.add(name="f")
    f.parameters.update({"type": "object", "properties": {"s": {"type": "string"}}})
    g = req.functions.add(name="g")
    g.parameters.update({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    body = build_chat_body(req, stream=False, endpoint="https://api.openai.com/v1")
    again = build_chat_body(req, stream=False, endpoint="https://api.openai.com/v1")
    assert again["tools"] is body["tools"]
    assert set(body["tools"].restores) == {"f"}  # g made nothing nullable
    out = answer('{"s":null}')
    unpack_completion(out, req, body)
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    out = answer('{"s":null}')
    unpack_completion(out, req)  # without the sent body: nothing is touched
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"s":null}'


# -- item 12: a 404 for a path, in the words of servers that explain it ----------------------------


def _404(body: bytes, provider: str = "openai") -> object:
    from server.providers.errors import error_for_status

    return error_for_status(404, body, {}, provider=provider, scrub=lambda s: s)


@pytest.mark.parametrize(
    "body",
    [
        # OpenAI itself, for a base URL without /v1 (https://api.openai.com + /chat/completions)
        b'{"error": {"message": "Invalid URL (POST /chat/completions)", "type": "invalid_request_error",'
        b' "param": null, "code": null}}',
        # OpenAI's other wording; note the "models" in the path it quotes
        b'{"error": {"message": "Unknown request URL: POST /models/chat/completions. Please check the URL'
        b' for typos, or see the docs at https://platform.openai.com/docs/api-reference/.",'
        b' "type": "invalid_request_error", "param": null, "code": "unknown_url"}}',
        # LM Studio (Express) when it does answer 404
        b'{"error": "Unexpected endpoint or method. (POST /chat/completions)"}',
        # Express's default
        b"Cannot POST /chat/completions",
        # Azure, a path it does not serve
        b'{"error": {"code": "404", "message": "Resource not found"}}',
    ],
)
def test_a_404_naming_the_url_is_the_endpoint_not_the_model(body: bytes) -> None:
    from server.errors import NotFound

    error = _404(body)
    assert isinstance(error, NotFound), error
    assert error.metadata["not_found"] == "endpoint"


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.",'
        b' "type": "invalid_request_error", "param": null, "code": "model_not_found"}}',
        b'{"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does'
        b' not exist."}}',
        b"\xff\xfe model \xc3\x28 not found",  # not UTF-8
    ],
)
def test_a_404_for_the_model_stays_model_not_found(body: bytes) -> None:
    from server.errors import ModelNotFound

    assert isinstance(_404(body), ModelNotFound)


# -- schema validation: property names and data are not keywords ---------------------------------


def _problems(parameters: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    from google.protobuf import struct_pb2

    from server.core.validation import schema_problems

    s = struct_pb2.Struct()
    s.update(parameters)
    return schema_problems(s)


@pytest.mark.parametrize(
    "parameters",
    [
        # a form-building tool: an argument named "required" (a flag), another named "properties"
        {
            "type": "object",
            "properties": {"required": {"type": "boolean"}, "properties": {"type": "string"}},
            "required": ["required"],
        },
        # definitions named like keywords
        {"type": "object", "properties": {}, "$defs": {"required": {"type": "string"}}},
        # data that happens to hold those keys
        {
            "type": "object",
            "properties": {"f": {"type": "object", "properties": {}, "default": {"required": 1}}},
        },
        {"type": "object", "properties": {"f": {"type": "object", "enum": [{"properties": "x"}]}}},
    ],
)
def test_names_and_data_are_not_taken_for_keywords(parameters: dict[str, Any]) -> None:
    assert _problems(parameters) == ()


def test_keywords_and_numbers_are_still_checked() -> None:
    problems = _problems(
        {
            "type": "object",
            "properties": {
                "required": {"type": "object", "properties": {}, "required": "x"},
                "n": {"type": "number", "default": [[float("nan")]], "enum": [float("inf")]},
            },
        }
    )
    assert sorted(p for p, _ in problems) == [  # a Struct's fields come in no fixed order
        ".properties.n.default[0][0]",
        ".properties.n.enum[0]",
        ".properties.required.required",
    ]
