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

On the way back, the nulls this conversion added are taken out again (`restore_absent`): a
`null` for a property the caller left optional and did not allow null means "absent". The
converter records where it made properties nullable (a `Restore`, None when it made none) and
the caller caches it with the converted function; real nulls (the caller's `type: [.., null]`,
`nullable: true`, an enum holding null, a `$ref` to a definition that accepts null) are kept,
and a value that could be an instance of several anyOf options is left alone.

Conversion is pure and allocates new containers for every object it touches; the caller
(`server.core.openai_request`) caches results per function fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.core.exact_json import dump_exact

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


class Shape:
    """Where a converted schema holds a null the caller's schema did not allow (issue 12, 11).

    Built once per function by the converter (cached with it); `restore_absent` follows it on
    the way back. `drop`: properties of this object made nullable, whose `null` means "absent";
    `props`: shapes of property values that hold such objects; `items`: the shape of every
    element of an array; `options`: (kind, shape or None) of every option of an anyOf one of
    whose options holds some: an object value goes to the one option whose properties are
    exactly its keys (every property of a strict object is required), a list to the one array
    option, anything ambiguous is left alone; `ref`: the shape is that of a definition (`#` is
    the root).
    """

    __slots__ = ("drop", "items", "options", "props", "ref")

    def __init__(self, ref: str | None = None) -> None:
        self.drop: frozenset[str] = frozenset()
        self.props: dict[str, Shape] = {}
        self.items: Shape | None = None
        self.options: list[tuple[Kind, Shape | None]] = []
        self.ref = ref


# An anyOf option's or a definition's kind: (its property names when it is an object, None
# otherwise; whether it is an array; the $ref it is, resolved through Restore.kinds, or "" for
# "may be anything" (a nested anyOf), else None).
Kind = tuple[frozenset[str] | None, bool, str | None]


@dataclass(frozen=True)
class Restore:
    """What one function's strict form added: its root Shape, its definitions' shapes and kinds."""

    root: Shape
    defs: dict[str, Shape | None]
    kinds: dict[str, Kind]


@dataclass
class _Walk:
    """What one conversion has seen so far: the root definitions and the size counters."""

    defs: frozenset[str] = frozenset()
    properties: int = 0
    enum_values: int = 0
    chars: int = 0
    refs: list[tuple[str, str]] = field(default_factory=list)
    # Properties wrapped as `anyOf: [$ref, null]`: (shape, name, ref); whether null is new
    # depends on the definition, known once every definition is converted.
    ref_drops: list[tuple[Shape, str, str]] = field(default_factory=list)
    made_nullable: int = 0

    def count_chars(self, path: str, n: int) -> None:
        self.chars += n
        if self.chars > MAX_TOTAL_CHARS:
            raise UnsupportedSchema(
                path, f"more than {MAX_TOTAL_CHARS} characters of names and values in all"
            )


def to_strict_function(function: dict[str, Any]) -> dict[str, Any]:
    """The strict form of `{name, description, parameters}`; raises UnsupportedSchema."""
    return convert_function(function)[0]


def convert_function(function: dict[str, Any]) -> tuple[dict[str, Any], Restore | None]:
    """The strict form and what undoes its added nulls (None: no property was made nullable).

    Raises UnsupportedSchema.
    """
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
    out, root_shape = _object(
        {**params, "properties": params.get("properties", {})}, "parameters", walk, depth=1
    )
    for key in ("description", "title"):
        if key in params:
            out[key] = params[key]
    def_shapes: dict[str, Shape | None] = {"#": root_shape}
    def_nodes: dict[str, dict[str, Any]] = {"#": out}
    for defs_key, defs in all_defs.items():
        converted: dict[str, Any] = {}
        for name, schema in defs.items():
            walk.count_chars(f"parameters.{defs_key}", len(name))
            node, shape = _node(schema, f"parameters.{defs_key}.{name}", walk, depth=0)
            converted[name] = node
            def_nodes[f"#/{defs_key}/{name}"] = node
            def_shapes[f"#/{defs_key}/{name}"] = shape
        out[defs_key] = converted
    for path, ref in walk.refs:
        if ref != "#" and ref not in walk.defs:
            raise UnsupportedSchema(path, f"$ref {ref!r} points outside the root $defs/definitions")
    for shape, name, ref in walk.ref_drops:
        if _accepts_null(def_nodes[ref]):  # the caller's definition allowed null already
            shape.drop = shape.drop - {name}
            walk.made_nullable -= 1
    strict = {
        "name": function["name"],
        "description": function.get("description") or "",
        "strict": True,
        "parameters": out,
    }
    restore = None
    if walk.made_nullable > 0 and root_shape is not None:
        restore = Restore(root_shape, def_shapes, {ref: _kind(n) for ref, n in def_nodes.items()})
    return strict, restore


def strict_or_unchanged(function: dict[str, Any]) -> dict[str, Any]:
    """The strict form, or `function` itself (with a warning) when it cannot be converted."""
    return strict_with_restore(function)[0]


def strict_with_restore(function: dict[str, Any]) -> tuple[dict[str, Any], Restore | None]:
    """`strict_or_unchanged` and the Restore of the strict form (None when unchanged)."""
    try:
        return convert_function(function)
    except UnsupportedSchema as exc:
        # Schemas are caller-authored tool definitions, never credentials: name + location only.
        logger.warning(
            "function %r sent without strict mode: %s",
            function.get("name"),
            exc,
            extra={"function_name": function.get("name"), "schema_path": exc.path},
        )
        return function, None
    except (TypeError, AttributeError, KeyError, RecursionError) as exc:
        # A shape the rules above did not foresee (a converter bug): strict mode off for this
        # function, never an INTERNAL for the request.
        logger.warning(
            "function %r sent without strict mode: the converter failed (%s)",
            function.get("name"),
            type(exc).__name__,
            extra={"function_name": function.get("name")},
        )
        return function, None


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


def _object(
    schema: dict[str, Any], path: str, walk: _Walk, depth: int
) -> tuple[dict[str, Any], Shape | None]:
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
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise UnsupportedSchema(f"{path}.required", "is not a list of names")
    undefined = [r for r in required if r not in properties]
    if undefined:
        raise UnsupportedSchema(f"{path}.required", f"names undefined properties {undefined!r}")
    walk.properties += len(properties)
    if walk.properties > MAX_PROPERTIES:
        raise UnsupportedSchema(path, f"more than {MAX_PROPERTIES} properties in all")
    converted: dict[str, Any] = {}
    shape = Shape()
    for name, value in properties.items():
        where = f"{path}.properties.{name}"
        walk.count_chars(where, len(name))
        node, inner = _node(value, where, walk, depth)
        if inner is not None:
            shape.props[name] = inner
        if name in required:
            converted[name] = node
            continue
        converted[name], made = _nullable(node)
        if made:
            shape.drop = shape.drop | {name}
            walk.made_nullable += 1
            if "$ref" in node:
                walk.ref_drops.append((shape, name, node["$ref"]))
    out = {
        "type": schema.get("type", "object"),
        "properties": converted,
        "additionalProperties": False,
        "required": list(properties),
    }
    return out, shape if shape.drop or shape.props else None


def _node(schema: Any, path: str, walk: _Walk, depth: int) -> tuple[dict[str, Any], Shape | None]:
    """One schema and the Shape of its added nulls; `depth` is the number of objects enclosing it."""
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
        return out, Shape(ref=ref)

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
            return (_nullable(flat)[0] if nullable else flat), None
        converted_options: list[dict[str, Any]] = []
        shape = Shape()
        kept: list[tuple[Kind, Shape | None]] = []
        for n, o in enumerate(options):
            node, inner = _node(o, f"{path}.anyOf[{n}]", walk, depth)
            converted_options.append(node)
            kept.append((_kind(node), inner))
        if any(inner is not None for _, inner in kept):
            shape.options = kept  # all of them: a value must match exactly one to be touched
        out = {"anyOf": converted_options}
        for key in ("description", "title", "default"):
            if key in schema:
                out[key] = schema[key]
        for key in schema:
            if key in _KEPT and key not in out:
                raise UnsupportedSchema(path, f"'{key}' beside anyOf is not supported in strict mode")
        return (_nullable(out)[0] if nullable else out), (shape if shape.options else None)
    if "anyOf" in schema:
        raise UnsupportedSchema(path, "'type' together with 'anyOf' is not supported in strict mode")

    param_type = schema["type"]
    if isinstance(param_type, list):
        if not param_type or not all(isinstance(t, str) for t in param_type):
            raise UnsupportedSchema(path, "'type' is not a type name or a list of them")
        type_set = set(param_type)
    elif isinstance(param_type, str):
        type_set = {param_type}
    else:
        raise UnsupportedSchema(path, "'type' is not a type name or a list of them")
    shape = Shape()
    if "object" in type_set:
        out, inner = _object(schema, path, walk, depth + 1)
        if inner is not None:
            shape = inner
    else:
        out = {"type": param_type}
    if "array" in type_set:
        items = schema.get("items")
        if not isinstance(items, dict):
            raise UnsupportedSchema(path, "is an array without a single 'items' schema")
        out["items"], shape.items = _node(items, f"{path}.items", walk, depth)
    out = _keep(schema, out, walk, path)
    if nullable:
        out = _nullable(out)[0]
    return out, (shape if shape.drop or shape.props or shape.items else None)


def _nullable(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`node` also accepting null, and whether null is new (a new dict when it changes; `node`
    is ours, fresh)."""
    if "$ref" in node or "const" in node:
        if "const" in node and node["const"] is None:
            return node, False
        # A $ref takes no siblings inside the anyOf; its description and title go outside.
        outer: dict[str, Any] = {}
        if "$ref" in node:
            outer = {k: node.pop(k) for k in ("description", "title") if k in node}
        return {"anyOf": [node, dict(_NULL)], **outer}, True
    options = node.get("anyOf")
    if isinstance(options, list):
        if any(_accepts_null(o) for o in options):
            return node, False
        node["anyOf"] = [*options, dict(_NULL)]
        return node, True
    types = node.get("type")
    type_list = list(types) if isinstance(types, list) else [types]
    enum = node.get("enum")
    made = False
    if "null" not in type_list:
        node["type"] = [*type_list, "null"]
        made = True
    if isinstance(enum, list) and None not in enum:
        # `type: [string, null]` with `enum: [a, b]` never accepted null either.
        node["enum"] = [*enum, None]
        made = True
    return node, made


def _accepts_null(option: dict[str, Any]) -> bool:
    """Whether a converted schema accepts null (its type, its enum, or one anyOf option)."""
    options = option.get("anyOf")
    if isinstance(options, list):
        return any(isinstance(o, dict) and _accepts_null(o) for o in options)
    if "const" in option:
        return option["const"] is None
    t = option.get("type")
    if not (t == "null" or (isinstance(t, list) and "null" in t)):
        return False
    enum = option.get("enum")
    return not isinstance(enum, list) or None in enum


def _kind(node: dict[str, Any]) -> Kind:
    """What values a converted schema takes, as far as picking an anyOf option needs."""
    ref = node.get("$ref")
    if isinstance(ref, str):
        return None, False, ref
    if "anyOf" in node:
        return None, True, ""  # a nested anyOf: may be anything, so never a unique pick
    properties = node.get("properties")
    t = node.get("type")
    is_array = t == "array" or (isinstance(t, list) and "array" in t)
    return (frozenset(properties) if isinstance(properties, dict) else None), is_array, None


def _is_bare_primitive(option: Any) -> bool:
    if not isinstance(option, dict) or not option.keys() <= _BARE_OPTION_KEYS:
        return False
    t = option.get("type")
    if isinstance(t, str):
        return t in _PRIMITIVES
    return isinstance(t, list) and bool(t) and all(isinstance(x, str) and x in _PRIMITIVES for x in t)


# -- on the way back: a null the strict form added means "absent" -------------------------------

# Deeper answers keep their nulls below this (a $ref cycle can describe any depth; the walk
# must not exhaust Python's stack).
_MAX_RESTORE_DEPTH = 64


def restore_absent(completion: dict[str, Any], restores: dict[str, Restore]) -> None:
    """Drop, in place, from the tool-call arguments of every choice, the `null` values of the
    properties the strict form made nullable (`restores`: by function name), so the tool gets
    the absent key its own schema meant. Real nulls (nullable in the caller's schema) stay.

    Arguments that are not a JSON object are left as written (a cut call, say); only arguments
    that lost a key are re-serialized (compact JSON, numbers exact).
    """
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(calls, list):
            continue
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                continue
            name = fn.get("name")
            restore = restores.get(name) if isinstance(name, str) else None
            arguments = fn.get("arguments")
            if restore is None or not isinstance(arguments, str) or "null" not in arguments:
                continue
            try:
                args = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                continue
            if isinstance(args, dict) and _drop_nulls(args, restore.root, restore, 0):
                try:
                    fn["arguments"] = _dump_exact(arguments, args, restore)
                except (TypeError, ValueError, RecursionError):
                    # Nested past what the serializers take: the text as written, with its nulls.
                    logger.warning(
                        "tool call %r: arguments too deep to restore absent properties; sent as written",
                        name,
                        extra={"function_name": name},
                    )


def _dump_exact(original: str, args: dict[str, Any], restore: Restore) -> str:
    """`args` without the dropped nulls, numbers exact (`server.core.exact_json`)."""
    return dump_exact(original, args, lambda exact: _drop_nulls(exact, restore.root, restore, 0))


def _drop_nulls(value: Any, shape: Shape | None, restore: Restore, depth: int) -> bool:
    if depth > _MAX_RESTORE_DEPTH:
        return False
    hops = 0
    while shape is not None and shape.ref is not None:
        if hops > 32:  # a definition that is only a $ref to itself (or a ring of them)
            return False
        shape, hops = restore.defs.get(shape.ref), hops + 1
    if shape is None:
        return False
    changed = False
    if isinstance(value, dict):
        for name in shape.drop:
            if name in value and value[name] is None:
                del value[name]
                changed = True
        for name, inner in shape.props.items():
            if name in value:
                changed = _drop_nulls(value[name], inner, restore, depth + 1) or changed
        if shape.options:
            changed = _drop_in_option(value, shape.options, restore, depth) or changed
    elif isinstance(value, list):
        if shape.items is not None:
            for item in value:
                changed = _drop_nulls(item, shape.items, restore, depth + 1) or changed
        elif shape.options:
            changed = _drop_in_option(value, shape.options, restore, depth) or changed
    return changed


def _drop_in_option(
    value: dict[str, Any] | list[Any], options: list[tuple[Kind, Shape | None]], restore: Restore, depth: int
) -> bool:
    """Follow the one anyOf option `value` can be an instance of; none or several: leave it."""
    keys = frozenset(value) if isinstance(value, dict) else None
    picked: list[Shape | None] = []
    for kind, shape in options:
        seen = 0
        while kind[2] and seen < 32:  # a $ref option: its definition's kind
            kind, seen = restore.kinds.get(kind[2], (None, True, "")), seen + 1
        if kind[2] is not None:  # may be anything (or a $ref loop)
            picked.append(None)
        elif (keys is not None and kind[0] == keys) or (keys is None and kind[1]):
            picked.append(shape)
    if len(picked) != 1 or picked[0] is None:
        return False
    return _drop_nulls(value, picked[0], restore, depth + 1)
