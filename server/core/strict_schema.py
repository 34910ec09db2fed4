"""Function schemas to OpenAI structured-output ("strict") form, without changing what they mean.

Strict mode wants every object closed (`additionalProperties: false`) with every property in
`required`, and accepts only a subset of JSON Schema. A conversion that cannot keep the
function's meaning is not made: the function is sent as it was, without `strict` (strict off
for that function only; the others of the request stay strict).

Rules (the seed's, from letta's `convert_to_structured_output`, made faithful where it lost data):
- the function gets `strict: true` and a `description` ("" when absent);
- every object (parameters, nested properties, array items, anyOf options, `$defs`) gets
  `additionalProperties: false` and every one of its properties in `required`;
- a property that was optional becomes nullable, OpenAI's documented pattern: `null` joins its
  type (`{"type": ["string", "null"]}`, and `null` joins its `enum`), or `{"type": "null"}`
  joins its `anyOf`; a `$ref` or `const` is wrapped as `anyOf: [it, {"type": "null"}]`. The
  model then answers `null` where it would have left the argument out;
- OpenAPI's `nullable: true` becomes the same `null` type;
- `anyOf` whose options are all bare primitive types (string, number, integer, boolean, null)
  is flattened to a type list; any other `anyOf` is kept with each option converted;
- kept keywords: type, description, title, default, enum, const, format, pattern, minLength,
  maxLength, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, minItems,
  maxItems; pure annotations (examples, $schema, $id, $comment, deprecated, readOnly,
  writeOnly) are dropped, since they constrain nothing; `$ref` is kept (with description,
  title, default) when it points into the root `$defs`/`definitions` (or is `#`), which are
  converted.

Outside strict mode, so sent unconverted (`UnsupportedSchema`, a warning with the path):
- any other keyword (oneOf, allOf, not, if, uniqueItems, patternProperties, minProperties,
  prefixItems, ...): dropping an assertion would let the model produce what the tool refuses;
- a map: an object whose `additionalProperties` is a schema or true, or that has no
  `properties` at all (closing it would forbid every key the tool expects);
- `required` naming a property that is not defined (strict mode could never produce it);
- a root that is not a plain object (`anyOf`, `$ref`, `enum`, ... at the root), a property
  without `type` (and without `anyOf`/`$ref`), an array without a single `items` schema, a
  `$ref` that points outside the root definitions or carries constraints beside it, `type`
  together with `anyOf`, nested `$defs`;
- OpenAI's documented size limits: more than 10 levels of object nesting (the parameters
  object is level 1; `$defs` entries count from 1), more than 5,000 properties in all, more
  than 1,000 enum values in all, a string enum of more than 250 values whose values total more
  than 15,000 characters, more than 120,000 characters of property names, definition names,
  enum and const values in all.

Conversion is pure and allocates new containers for every object it touches; the caller
(`server.core.openai_request`) caches results per function fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
# Annotations: dropping them changes nothing a value may be.
_ANNOTATIONS = frozenset(
    {"examples", "example", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
# Keywords the converter itself reads.
_STRUCTURAL = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "anyOf", "$ref", "nullable"}
)
_KNOWN = frozenset(_KEPT) | _ANNOTATIONS | _STRUCTURAL
_ROOT_KNOWN = (
    frozenset({"type", "properties", "required", "additionalProperties", "description", "title"})
    | _ANNOTATIONS
)
_REF_SIBLINGS = frozenset({"$ref", "description", "title", "default"}) | _ANNOTATIONS
_BARE_OPTION_KEYS = frozenset({"type", "title", "description"})
_NULL: dict[str, Any] = {"type": "null"}

# OpenAI's documented strict-mode limits (Structured Outputs, "Supported schemas").
MAX_NESTING = 10
MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000
LARGE_ENUM = 250
MAX_LARGE_ENUM_CHARS = 15_000
MAX_TOTAL_CHARS = 120_000


class UnsupportedSchema(ValueError):
    """A schema construct that strict mode cannot express; `path` locates it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class _Walk:
    """What one conversion has seen so far: the root definitions and the size counters."""

    defs: frozenset[str] = frozenset()
    properties: int = 0
    enum_values: int = 0
    chars: int = 0
    refs: list[tuple[str, str]] = field(default_factory=list)

    def count_chars(self, path: str, n: int) -> None:
        self.chars += n
        if self.chars > MAX_TOTAL_CHARS:
            raise UnsupportedSchema(
                path, f"more than {MAX_TOTAL_CHARS} characters of names and values in all"
            )


def to_strict_function(function: dict[str, Any]) -> dict[str, Any]:
    """The strict form of `{name, description, parameters}`; raises UnsupportedSchema."""
    params = function.get("parameters") or {}
    if not isinstance(params, dict):
        raise UnsupportedSchema("parameters", "is not an object")
    root_type = params.get("type", "object")
    if root_type != "object":
        raise UnsupportedSchema("parameters", f"type must be 'object', not {root_type!r}")
    defs_keys = [k for k in ("$defs", "definitions") if k in params]
    for key in params:
        if key not in _ROOT_KNOWN and key not in defs_keys:
            raise UnsupportedSchema("parameters", f"'{key}' at the root is not supported in strict mode")
    walk = _Walk()
    all_defs: dict[str, dict[str, Any]] = {}
    for defs_key in defs_keys:
        defs = params[defs_key]
        if not isinstance(defs, dict):
            raise UnsupportedSchema(f"parameters.{defs_key}", "is not an object")
        all_defs[defs_key] = defs
    walk.defs = frozenset(f"#/{k}/{name}" for k, defs in all_defs.items() for name in defs)
    if not isinstance(params.get("properties", {}), dict):
        raise UnsupportedSchema("parameters.properties", "is not an object")
    out = _object({**params, "properties": params.get("properties", {})}, "parameters", walk, depth=1)
    for key in ("description", "title"):
        if key in params:
            out[key] = params[key]
    for defs_key, defs in all_defs.items():
        converted: dict[str, Any] = {}
        for name, schema in defs.items():
            walk.count_chars(f"parameters.{defs_key}", len(name))
            converted[name] = _node(schema, f"parameters.{defs_key}.{name}", walk, depth=0)
        out[defs_key] = converted
    for path, ref in walk.refs:
        if ref != "#" and ref not in walk.defs:
            raise UnsupportedSchema(path, f"$ref {ref!r} points outside the root $defs/definitions")
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


def _keep(src: dict[str, Any], dst: dict[str, Any], walk: _Walk, path: str) -> dict[str, Any]:
    for key in _KEPT:
        if key in src:
            dst[key] = src[key]
    enum = src.get("enum")
    if isinstance(enum, list):
        walk.enum_values += len(enum)
        if walk.enum_values > MAX_ENUM_VALUES:
            raise UnsupportedSchema(path, f"more than {MAX_ENUM_VALUES} enum values in all")
        text = sum(len(v) for v in enum if isinstance(v, str))
        if len(enum) > LARGE_ENUM and text > MAX_LARGE_ENUM_CHARS:
            raise UnsupportedSchema(
                path, f"an enum of more than {LARGE_ENUM} values with over {MAX_LARGE_ENUM_CHARS} characters"
            )
        walk.count_chars(path, text)
        dst["enum"] = list(enum)  # a new list: nullable() may extend it
    const = src.get("const")
    if isinstance(const, str):
        walk.count_chars(path, len(const))
    return dst


def _object(schema: dict[str, Any], path: str, walk: _Walk, depth: int) -> dict[str, Any]:
    """`properties`, closed, every property required; optional ones made nullable."""
    if depth > MAX_NESTING:
        raise UnsupportedSchema(path, f"more than {MAX_NESTING} levels of object nesting")
    extra = schema.get("additionalProperties", False)
    if extra is not False:
        raise UnsupportedSchema(
            path, "is a map (additionalProperties is not false): strict mode would close it"
        )
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        raise UnsupportedSchema(path, "is an object without 'properties' (a free-form map)")
    required = schema.get("required") or []
    if not isinstance(required, list):
        raise UnsupportedSchema(f"{path}.required", "is not a list")
    undefined = [r for r in required if r not in properties]
    if undefined:
        raise UnsupportedSchema(f"{path}.required", f"names undefined properties {undefined!r}")
    walk.properties += len(properties)
    if walk.properties > MAX_PROPERTIES:
        raise UnsupportedSchema(path, f"more than {MAX_PROPERTIES} properties in all")
    converted: dict[str, Any] = {}
    for name, value in properties.items():
        where = f"{path}.properties.{name}"
        walk.count_chars(where, len(name))
        node = _node(value, where, walk, depth)
        converted[name] = node if name in required else _nullable(node)
    return {
        "type": schema.get("type", "object"),
        "properties": converted,
        "additionalProperties": False,
        "required": list(properties),
    }


def _node(schema: Any, path: str, walk: _Walk, depth: int) -> dict[str, Any]:
    """One schema; `depth` is the number of objects enclosing it."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(path, "is not a schema object")
    for key in schema:
        if key not in _KNOWN:
            raise UnsupportedSchema(path, f"'{key}' is not supported in strict mode")

    ref = schema.get("$ref")
    if ref is not None:
        siblings = [k for k in schema if k not in _REF_SIBLINGS]
        if siblings:
            raise UnsupportedSchema(path, f"$ref with {siblings!r} beside it is not supported in strict mode")
        if not isinstance(ref, str):
            raise UnsupportedSchema(path, "$ref is not a string")
        walk.refs.append((path, ref))
        out: dict[str, Any] = {"$ref": ref}
        for key in ("description", "title", "default"):
            if key in schema:
                out[key] = schema[key]
        return out

    nullable = schema.get("nullable") is True
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
            flat = _keep(schema, {"type": types}, walk, path)
            return _nullable(flat) if nullable else flat
        out = {"anyOf": [_node(o, f"{path}.anyOf[{n}]", walk, depth) for n, o in enumerate(options)]}
        for key in ("description", "title", "default"):
            if key in schema:
                out[key] = schema[key]
        for key in schema:
            if key in _KEPT and key not in out:
                raise UnsupportedSchema(path, f"'{key}' beside anyOf is not supported in strict mode")
        return _nullable(out) if nullable else out
    if "anyOf" in schema:
        raise UnsupportedSchema(path, "'type' together with 'anyOf' is not supported in strict mode")

    param_type = schema["type"]
    type_set = set(param_type) if isinstance(param_type, list) else {param_type}
    if "object" in type_set:
        out = _object(schema, path, walk, depth + 1)
    else:
        out = {"type": param_type}
    if "array" in type_set:
        items = schema.get("items")
        if not isinstance(items, dict):
            raise UnsupportedSchema(path, "is an array without a single 'items' schema")
        out["items"] = _node(items, f"{path}.items", walk, depth)
    out = _keep(schema, out, walk, path)
    return _nullable(out) if nullable else out


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """`node` also accepting null (a new dict when it changes; `node` is ours, fresh)."""
    if "$ref" in node or "const" in node:
        # A $ref takes no siblings inside the anyOf; its description and title go outside.
        outer: dict[str, Any] = {}
        if "$ref" in node:
            outer = {k: node.pop(k) for k in ("description", "title") if k in node}
        return {"anyOf": [node, dict(_NULL)], **outer}
    options = node.get("anyOf")
    if isinstance(options, list):
        if not any(_accepts_null(o) for o in options):
            node["anyOf"] = [*options, dict(_NULL)]
        return node
    types = node.get("type")
    type_list = list(types) if isinstance(types, list) else [types]
    if "null" in type_list:
        return node
    node["type"] = [*type_list, "null"]
    enum = node.get("enum")
    if isinstance(enum, list) and None not in enum:
        node["enum"] = [*enum, None]
    return node


def _accepts_null(option: dict[str, Any]) -> bool:
    t = option.get("type")
    return t == "null" or (isinstance(t, list) and "null" in t)


def _is_bare_primitive(option: Any) -> bool:
    if not isinstance(option, dict) or not option.keys() <= _BARE_OPTION_KEYS:
        return False
    t = option.get("type")
    if isinstance(t, str):
        return t in _PRIMITIVES
    return isinstance(t, list) and bool(t) and all(x in _PRIMITIVES for x in t)
