"""Function schemas to OpenAI structured-output ("strict") form.

Rules (the seed's, from letta's `convert_to_structured_output`, extended where it lost data):
- the function gets `strict: true` and a `description` ("" when absent);
- every object (parameters, nested properties, array items, anyOf options, `$defs`) gets
  `additionalProperties: false` and every one of its properties in `required`;
- `anyOf` whose options are all bare primitive types (string, number, integer, boolean, null)
  is flattened to a type list (`{"type": ["string", "null"]}`); any other `anyOf` is kept with
  each option converted (letta flattens options carrying `enum`/constraints too, losing them);
- kept keywords: type, description, title, default, enum, const, format, pattern, minLength,
  maxLength, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, minItems,
  maxItems (letta keeps the first ten; the rest are accepted by strict mode); `$ref` is kept
  (with its description) and root `$defs`/`definitions` are converted; anything else
  (examples, uniqueItems, `required`, ...) is dropped.

A schema strict mode cannot express raises `UnsupportedSchema`: a property without `type`
(and without `anyOf`/`$ref`), an object without `properties` (a free-form map), an array
without a single `items` schema, `oneOf`/`allOf`/`not`, nested `$defs`. `strict_or_unchanged`
then logs a warning and the function is sent as it was.

Conversion is pure and allocates new containers for every object it touches; the caller
(`server.core.openai_request`) caches results per function fingerprint.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PRIMITIVES = frozenset({"string", "number", "integer", "boolean", "null"})
_KEPT = (
    "description",
    "title",
    "default",
    "enum",
    "const",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
)
_BARE_OPTION_KEYS = frozenset({"type", "title", "description"})
_UNSUPPORTED = ("oneOf", "allOf", "not", "if", "$defs", "definitions", "patternProperties")


class UnsupportedSchema(ValueError):
    """A schema construct that strict mode cannot express; `path` locates it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_strict_function(function: dict[str, Any]) -> dict[str, Any]:
    """The strict form of `{name, description, parameters}`; raises UnsupportedSchema."""
    params = function.get("parameters") or {}
    if not isinstance(params, dict):
        raise UnsupportedSchema("parameters", "is not an object")
    root_type = params.get("type", "object")
    if root_type != "object":
        raise UnsupportedSchema("parameters", f"type must be 'object', not {root_type!r}")
    for key in _UNSUPPORTED[:4]:
        if key in params:
            raise UnsupportedSchema("parameters", f"'{key}' is not supported in strict mode")
    properties = params.get("properties", {})
    if not isinstance(properties, dict):
        raise UnsupportedSchema("parameters.properties", "is not an object")
    out: dict[str, Any] = {
        "type": "object",
        "properties": {k: _node(v, f"parameters.properties.{k}") for k, v in properties.items()},
        "additionalProperties": False,
        "required": list(properties),
    }
    for defs_key in ("$defs", "definitions"):
        defs = params.get(defs_key)
        if defs is not None:
            if not isinstance(defs, dict):
                raise UnsupportedSchema(f"parameters.{defs_key}", "is not an object")
            out[defs_key] = {k: _node(v, f"parameters.{defs_key}.{k}") for k, v in defs.items()}
    return {
        "name": function["name"],
        "description": function.get("description") or "",
        "strict": True,
        "parameters": out,
    }


def strict_or_unchanged(function: dict[str, Any]) -> dict[str, Any]:
    """The strict form, or `function` itself (with a warning) when it cannot be converted."""
    try:
        return to_strict_function(function)
    except UnsupportedSchema as exc:
        # Schemas are caller-authored tool definitions, never credentials: name + location only.
        logger.warning(
            "function %r sent without strict mode: %s",
            function.get("name"),
            exc,
            extra={"function_name": function.get("name"), "schema_path": exc.path},
        )
        return function


def _keep(src: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
    for key in _KEPT:
        if key in src:
            dst[key] = src[key]
    return dst


def _node(schema: Any, path: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise UnsupportedSchema(path, "is not a schema object")
    for key in _UNSUPPORTED:
        if key in schema:
            raise UnsupportedSchema(path, f"'{key}' is not supported in strict mode")

    ref = schema.get("$ref")
    if ref is not None:
        out: dict[str, Any] = {"$ref": ref}
        if "description" in schema:
            out["description"] = schema["description"]
        return out

    if "type" not in schema:
        options = schema.get("anyOf")
        if not isinstance(options, list) or not options:
            raise UnsupportedSchema(path, "has no 'type'")
        if all(_is_bare_primitive(o) for o in options):
            types: list[str] = []
            for o in options:
                for t in o["type"] if isinstance(o["type"], list) else (o["type"],):
                    if t not in types:
                        types.append(t)
            return _keep(schema, {"type": types})
        out = {"anyOf": [_node(o, f"{path}.anyOf[{n}]") for n, o in enumerate(options)]}
        for key in ("description", "title", "default"):
            if key in schema:
                out[key] = schema[key]
        return out

    param_type = schema["type"]
    type_set = set(param_type) if isinstance(param_type, list) else {param_type}
    out = {"type": param_type}
    if "object" in type_set:
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            raise UnsupportedSchema(path, "is an object without 'properties'")
        out["properties"] = {k: _node(v, f"{path}.properties.{k}") for k, v in properties.items()}
        out["additionalProperties"] = False
        out["required"] = list(properties)
    if "array" in type_set:
        items = schema.get("items")
        if not isinstance(items, dict):
            raise UnsupportedSchema(path, "is an array without a single 'items' schema")
        out["items"] = _node(items, f"{path}.items")
    return _keep(schema, out)


def _is_bare_primitive(option: Any) -> bool:
    if not isinstance(option, dict) or not option.keys() <= _BARE_OPTION_KEYS:
        return False
    t = option.get("type")
    if isinstance(t, str):
        return t in _PRIMITIVES
    return isinstance(t, list) and bool(t) and all(x in _PRIMITIVES for x in t)
