"""Issue 12 item 11: strict conversion keeps a function's meaning, or is not made.

Table-driven on `to_strict_function`; the exact bodies an upstream receives are in
tests/integration/test_hardening_semantics.py.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from server.core.strict_schema import (
    MAX_ENUM_VALUES,
    MAX_NESTING,
    MAX_PROPERTIES,
    UnsupportedSchema,
    strict_or_unchanged,
    to_strict_function,
)


def fn(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"name": "f", "description": "does f", "parameters": parameters}


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required is not None:
        out["required"] = required
    return out


def converted_property(schema: dict[str, Any], *, optional: bool) -> dict[str, Any]:
    params = obj({"p": schema}, [] if optional else ["p"])
    out = to_strict_function(fn(params))["parameters"]
    assert out["required"] == ["p"] and out["additionalProperties"] is False
    return dict(out["properties"]["p"])


NULLABLE_ROWS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("string", {"type": "string"}, {"type": ["string", "null"]}),
    ("type list", {"type": ["string", "integer"]}, {"type": ["string", "integer", "null"]}),
    ("already nullable", {"type": ["string", "null"]}, {"type": ["string", "null"]}),
    ("enum", {"type": "string", "enum": ["a", "b"]}, {"type": ["string", "null"], "enum": ["a", "b", None]}),
    (
        "const",
        {"type": "string", "const": "x"},
        {"anyOf": [{"type": "string", "const": "x"}, {"type": "null"}]},
    ),
    (
        "anyOf without null",
        {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer"}]},
        {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer"}, {"type": "null"}]},
    ),
    (
        "anyOf with null",
        {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]},
        {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]},
    ),
    (
        "$ref",
        {"$ref": "#", "description": "D"},
        {"anyOf": [{"$ref": "#"}, {"type": "null"}], "description": "D"},
    ),
    (
        "array",
        {"type": "array", "items": {"type": "string"}},
        {"type": ["array", "null"], "items": {"type": "string"}},
    ),
]


@pytest.mark.parametrize(("case", "schema", "expected"), NULLABLE_ROWS, ids=[r[0] for r in NULLABLE_ROWS])
def test_an_optional_property_becomes_required_and_nullable(
    case: str, schema: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert converted_property(schema, optional=True) == expected


@pytest.mark.parametrize(("case", "schema", "expected"), NULLABLE_ROWS, ids=[r[0] for r in NULLABLE_ROWS])
def test_a_required_property_is_not_made_nullable(
    case: str, schema: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert converted_property(schema, optional=False) == schema


def test_openapi_nullable_becomes_a_null_type() -> None:
    assert converted_property({"type": "integer", "nullable": True}, optional=False) == {
        "type": ["integer", "null"]
    }


def test_annotations_are_dropped_and_the_input_is_not_touched() -> None:
    params = obj(
        {"u": {"type": "string", "enum": ["c", "f"], "examples": ["c"], "deprecated": False}},
        [],
        **{"$schema": "https://json-schema.org/draft/2020-12/schema", "description": "root"},
    )
    before = copy.deepcopy(params)
    out = to_strict_function(fn(params))["parameters"]
    assert out["properties"]["u"] == {"type": ["string", "null"], "enum": ["c", "f", None]}
    assert out["description"] == "root"
    assert params == before  # the enum list of the input was not extended


def test_refs_into_definitions_are_kept() -> None:
    params = obj(
        {"a": {"$ref": "#/definitions/A"}},
        ["a"],
        definitions={"A": obj({"x": {"type": "string"}}, ["x"])},
    )
    out = to_strict_function(fn(params))["parameters"]
    assert out["properties"]["a"] == {"$ref": "#/definitions/A"}
    assert out["definitions"]["A"]["additionalProperties"] is False


def _nest(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        node = obj({"x": node}, ["x"])
    return node


def _many(n: int) -> dict[str, Any]:
    return obj({f"p{i}": {"type": "string"} for i in range(n)}, [f"p{i}" for i in range(n)])


def _enum(n: int, width: int = 2) -> dict[str, Any]:
    return obj({"e": {"type": "string", "enum": [f"{i:0{width}d}" for i in range(n)]}}, ["e"])


@pytest.mark.parametrize(
    ("case", "at_limit", "over_limit", "path"),
    [
        (
            "object nesting",
            _nest(MAX_NESTING),
            _nest(MAX_NESTING + 1),
            "parameters" + ".properties.x" * MAX_NESTING,
        ),
        ("properties in all", _many(MAX_PROPERTIES), _many(MAX_PROPERTIES + 1), "parameters"),
        ("enum values in all", _enum(MAX_ENUM_VALUES), _enum(MAX_ENUM_VALUES + 1), "parameters.properties.e"),
        # 251 values of 60 characters: 15,060 characters in one large enum (the limit is 15,000).
        ("a large string enum's characters", _enum(251, 59), _enum(251, 60), "parameters.properties.e"),
    ],
)
def test_openai_size_limits(
    case: str, at_limit: dict[str, Any], over_limit: dict[str, Any], path: str
) -> None:
    assert to_strict_function(fn(at_limit))["strict"] is True
    with pytest.raises(UnsupportedSchema) as info:
        to_strict_function(fn(over_limit))
    assert info.value.path == path


@pytest.mark.parametrize(
    ("case", "parameters", "path"),
    [
        (
            "root anyOf",
            {"anyOf": [obj({"a": {"type": "string"}}), obj({"b": {"type": "string"}})]},
            "parameters",
        ),
        (
            "root $ref",
            {"$ref": "#/$defs/A", "$defs": {"A": obj({"a": {"type": "string"}}, ["a"])}},
            "parameters",
        ),
        (
            "root map",
            obj({"a": {"type": "string"}}, ["a"], additionalProperties={"type": "string"}),
            "parameters",
        ),
        (
            "nested map with properties",
            obj({"m": obj({"k": {"type": "string"}}, ["k"], additionalProperties=True)}, ["m"]),
            "parameters.properties.m",
        ),
        (
            "map inside array items",
            obj(
                {
                    "l": {
                        "type": "array",
                        "items": {"type": "object", "additionalProperties": {"type": "integer"}},
                    }
                },
                ["l"],
            ),
            "parameters.properties.l.items",
        ),
        ("required but undefined", obj({"a": {"type": "string"}}, ["a", "b"]), "parameters.required"),
        (
            "uniqueItems",
            obj({"t": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}, ["t"]),
            "parameters.properties.t",
        ),
        (
            "minProperties",
            obj({"o": obj({"a": {"type": "string"}}, ["a"], minProperties=1)}, ["o"]),
            "parameters.properties.o",
        ),
        (
            "type with anyOf",
            obj({"v": {"type": "string", "anyOf": [{"maxLength": 2}]}}, ["v"]),
            "parameters.properties.v",
        ),
        (
            "constraint beside a kept anyOf",
            obj(
                {"v": {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer"}], "minimum": 2}},
                ["v"],
            ),
            "parameters.properties.v",
        ),
        ("dangling $ref", obj({"i": {"$ref": "#/$defs/Nope"}}, ["i"]), "parameters.properties.i"),
        ("remote $ref", obj({"i": {"$ref": "https://example.com/s.json"}}, ["i"]), "parameters.properties.i"),
        (
            "$ref with a constraint",
            obj({"i": {"$ref": "#", "minLength": 1}}, ["i"]),
            "parameters.properties.i",
        ),
    ],
)
def test_outside_strict_mode_is_refused(case: str, parameters: dict[str, Any], path: str) -> None:
    with pytest.raises(UnsupportedSchema) as info:
        to_strict_function(fn(parameters))
    assert info.value.path == path


def test_a_refused_function_is_sent_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    source = fn(obj({"m": {"type": "object", "additionalProperties": True}}, ["m"]))
    with caplog.at_level(logging.WARNING, logger="server.core.strict_schema"):
        assert strict_or_unchanged(source) is source
    [record] = caplog.records
    assert "map" in record.getMessage() and "parameters.properties.m" in record.getMessage()
