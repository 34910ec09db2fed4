"""Strict (structured-output) conversion of function schemas."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from server.core.strict_schema import UnsupportedSchema, strict_or_unchanged, to_strict_function


def fn(properties: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {
        "name": "f",
        "description": "does f",
        "parameters": {"type": "object", "properties": properties, **params},
    }


def strict_params(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "required": list(properties),
        **extra,
    }


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "optional props become required, unknown keywords dropped",
        {"a": {"type": "string", "description": "A", "examples": ["x"]}, "b": {"type": "integer"}},
        {"a": {"type": "string", "description": "A"}, "b": {"type": "integer"}},
    ),
    (
        "enum, format, pattern, bounds, default, title kept",
        {
            "e": {"type": "string", "enum": ["x", "y"], "title": "E", "default": "x"},
            "d": {"type": "string", "format": "date-time", "pattern": "^2", "minLength": 1, "maxLength": 30},
            "n": {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": 2, "multipleOf": 0.5},
        },
        {
            "e": {"type": "string", "title": "E", "default": "x", "enum": ["x", "y"]},
            "d": {"type": "string", "format": "date-time", "pattern": "^2", "minLength": 1, "maxLength": 30},
            "n": {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": 2, "multipleOf": 0.5},
        },
    ),
    (
        "nested objects get additionalProperties false and all required",
        {
            "outer": {
                "type": "object",
                "description": "O",
                "properties": {
                    "inner": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
                    "y": {"type": "string"},
                },
                "required": ["inner", "y"],
            }
        },
        {
            "outer": {
                "type": "object",
                "properties": {
                    "inner": {
                        "type": "object",
                        "properties": {"x": {"type": "boolean"}},
                        "additionalProperties": False,
                        "required": ["x"],
                    },
                    "y": {"type": "string"},
                },
                "additionalProperties": False,
                "required": ["inner", "y"],
                "description": "O",
            }
        },
    ),
    (
        "arrays of objects, minItems/maxItems kept",
        {
            "rows": {
                "type": "array",
                "minItems": 1,
                "maxItems": 5,
                "items": {
                    "type": "object",
                    "properties": {"k": {"type": "string"}, "v": {"type": "number"}},
                    "required": ["k", "v"],
                },
            }
        },
        {
            "rows": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"k": {"type": "string"}, "v": {"type": "number"}},
                    "additionalProperties": False,
                    "required": ["k", "v"],
                },
                "minItems": 1,
                "maxItems": 5,
            }
        },
    ),
    (
        "anyOf of primitives flattened to a type list",
        {
            "maybe": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "description": "M",
                "default": None,
                "title": "Maybe",
            },
            "num": {"anyOf": [{"type": "integer"}, {"type": ["number", "integer"]}], "minimum": 0},
        },
        {
            "maybe": {"type": ["string", "null"], "description": "M", "title": "Maybe", "default": None},
            "num": {"type": ["integer", "number"], "minimum": 0},
        },
    ),
    (
        "anyOf with an enum option kept as anyOf (flattening would lose the enum)",
        {"mode": {"anyOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "null"}], "description": "M"}},
        {"mode": {"anyOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "null"}], "description": "M"}},
    ),
    (
        "anyOf with an object option converted recursively",
        {
            "x": {
                "anyOf": [
                    {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
                    {"type": "null"},
                ]
            }
        },
        {
            "x": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "additionalProperties": False,
                        "required": ["q"],
                    },
                    {"type": "null"},
                ]
            }
        },
    ),
    (
        "nullable object via a type list",
        {"o": {"type": ["object", "null"], "properties": {"z": {"type": "string"}}, "required": ["z"]}},
        {
            "o": {
                "type": ["object", "null"],
                "properties": {"z": {"type": "string"}},
                "additionalProperties": False,
                "required": ["z"],
            }
        },
    ),
    (
        "$ref kept with its description",
        {"item": {"$ref": "#", "description": "I"}},
        {"item": {"$ref": "#", "description": "I"}},
    ),
]


@pytest.mark.parametrize(("case", "properties", "expected"), CASES, ids=[c[0] for c in CASES])
def test_conversion(case: str, properties: dict[str, Any], expected: dict[str, Any]) -> None:
    # Every property required: these rows are about keywords; optional ones are
    # test_hardening_strict_schema.py's (they become nullable).
    source = fn(properties, required=list(properties))
    assert to_strict_function(source) == {
        "name": "f",
        "description": "does f",
        "strict": True,
        "parameters": strict_params(expected),
    }


def test_defs_are_converted() -> None:
    source = fn(
        {"item": {"$ref": "#/$defs/Item"}},
        required=["item"],
        **{
            "$defs": {
                "Item": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
            }
        },
    )
    assert to_strict_function(source)["parameters"] == strict_params(
        {"item": {"$ref": "#/$defs/Item"}},
        **{
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}},
                    "additionalProperties": False,
                    "required": ["id"],
                }
            }
        },
    )


def test_no_parameters_and_no_description() -> None:
    assert to_strict_function({"name": "ping", "parameters": {}}) == {
        "name": "ping",
        "description": "",
        "strict": True,
        "parameters": strict_params({}),
    }


def test_input_not_mutated() -> None:
    source = fn({"o": {"type": "object", "properties": {"x": {"type": "string"}}}}, required=[])
    before = repr(source)
    to_strict_function(source)
    assert repr(source) == before


@pytest.mark.parametrize(
    ("properties", "path"),
    [
        ({"free": {"type": "object", "description": "any map"}}, "parameters.properties.free"),
        ({"untyped": {"description": "no type"}}, "parameters.properties.untyped"),
        ({"arr": {"type": "array"}}, "parameters.properties.arr"),
        ({"tuple": {"type": "array", "items": [{"type": "string"}]}}, "parameters.properties.tuple"),
        ({"one": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}, "parameters.properties.one"),
        (
            {"deep": {"type": "object", "properties": {"x": {"allOf": [{"type": "string"}]}}}},
            "parameters.properties.deep.properties.x",
        ),
        ({"a": {"type": "array", "items": {"type": "object"}}}, "parameters.properties.a.items"),
    ],
)
def test_unconvertible(properties: dict[str, Any], path: str) -> None:
    with pytest.raises(UnsupportedSchema) as info:
        to_strict_function(fn(properties))
    assert info.value.path == path


def test_unconvertible_function_passes_through_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    source = fn({"free": {"type": "object"}})
    with caplog.at_level(logging.WARNING, logger="server.core.strict_schema"):
        assert strict_or_unchanged(source) is source
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "'f'" in record.getMessage()
    assert "parameters.properties.free" in record.getMessage()


def test_convertible_function_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="server.core.strict_schema"):
        out = strict_or_unchanged(fn({"a": {"type": "string"}}))
    assert out["strict"] is True
    assert caplog.records == []
