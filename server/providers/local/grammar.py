"""GBNF grammars (llama.cpp's format) that force the answer `{"function": NAME, "params": {...}}`.

Only llamacpp, koboldcpp and webui accept a grammar (see `endpoints.py`). The params object of
each function follows its JSON schema: strings, numbers, integers, booleans, null, enums/const,
arrays (with their `items`), nested objects with `properties`, type lists and anyOf/oneOf.
Properties come in the schema's order; required ones must appear, optional ones may be left out.
Anything the grammar cannot express (`$ref`, patterns, lengths, free-form objects) falls back to
"any JSON value" of that kind, so a grammar never rejects what the schema allows.

Only the basic GBNF constructs are used (literals, character classes, `|`, `( )`, `?`, `*`),
which every server's grammar engine reads. Whitespace and numbers are bounded (WS_INDENT_MAX).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from server.errors import FieldViolation, InvalidRequest
from server.providers.local.functions import FunctionSpec, specs_for_prompt
from server.providers.local.wrappers import FIRST_MESSAGE_FUNCTION, first_message_prefix, wrapper_uses_grammar

__all__ = ["build_grammar", "wrapper_uses_grammar"]

# Bounds, as llama.cpp's own JSON grammars (grammars/json.gbnf, json-schema-to-grammar): a weak
# model given `ws ::= [ \t\n]*` spent 98% of 2,166 tokens on whitespace. Between two tokens at
# most one space, or one line break and WS_INDENT_MAX blanks; numbers as JSON numbers of at most
# 16 integer and 16 fraction digits (and 3 exponent digits). Repetitions are written as nested
# optionals, `( x ( x )? )?` (what llama.cpp expands `x{0,n}` to): basic GBNF, one parse path.
WS_INDENT_MAX = 20
DIGITS_MAX = 16
EXPONENT_DIGITS_MAX = 3


def _up_to(item: str, count: int) -> str:
    """`item` repeated 0..count times, as nested optionals."""
    text = ""
    for _ in range(count):
        text = f"( {item} {text})?" if text else f"( {item} )?"
    return text


_BLANKS = _up_to(r"[ \t]", WS_INDENT_MAX)
_MORE_DIGITS = _up_to("[0-9]", DIGITS_MAX - 1)
_MORE_EXPONENT_DIGITS = _up_to("[0-9]", EXPONENT_DIGITS_MAX - 1)
_PRIMITIVES = "\n".join(
    [
        r'ws ::= ( " " | "\n" ' + _BLANKS + " )?",
        r'string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" hex hex hex hex ) )* "\""',
        "hex ::= [0-9a-fA-F]",
        f'integer ::= "-"? ( "0" | [1-9] {_MORE_DIGITS} )',
        f'number ::= integer ( "." [0-9] {_MORE_DIGITS} )? ( [eE] [-+]? [0-9] {_MORE_EXPONENT_DIGITS} )?',
        'boolean ::= "true" | "false"',
        'null ::= "null"',
        "value ::= object | array | string | number | boolean | null",
        'object ::= "{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"',
        'array ::= "[" ws ( value ( ws "," ws value )* )? ws "]"',
        "",
    ]
)
_TYPE_RULES = {
    "string": "string",
    "number": "number",
    "integer": "integer",
    "boolean": "boolean",
    "null": "null",
}


def build_grammar(
    functions: Sequence[Mapping[str, Any]],
    *,
    put_inner_thoughts_in_kwargs: bool,
    put_inner_thoughts_first: bool = True,
    first_message: bool = False,
) -> str:
    """A GBNF grammar for one call of one of `functions`.

    With `first_message` (and a `send_message` function) the prompt is already primed with
    `{"function": "send_message",`, so the grammar covers only the rest: `"params": {...}}`.
    """
    specs = specs_for_prompt(
        functions,
        put_inner_thoughts_in_kwargs=put_inner_thoughts_in_kwargs,
        put_inner_thoughts_first=put_inner_thoughts_first,
    )
    if not specs:
        description = "a '-grammar' wrapper needs at least one function to constrain the answer to"
        raise InvalidRequest(
            description, field_violations=[FieldViolation(field="functions", description=description)]
        )
    builder = _Builder()
    call_rules = [builder.function(i, spec) for i, spec in enumerate(specs)]
    if first_message_prefix(functions, first_message=first_message):
        index = next(i for i, spec in enumerate(specs) if spec.name == FIRST_MESSAGE_FUNCTION)
        root = f'ws {_json_lit("params")} ws ":" ws f{index}-params ws "}}"'
    else:
        root = f"ws ( {' | '.join(call_rules)} )"
    return "\n".join([f"root ::= {root}", *builder.rules, _PRIMITIVES])


class _Builder:
    def __init__(self) -> None:
        self.rules: list[str] = []

    def add(self, name: str, body: str) -> str:
        self.rules.append(f"{name} ::= {body}")
        return name

    def function(self, index: int, spec: FunctionSpec) -> str:
        name = f"f{index}"
        params = self.object_schema(f"{name}-params", spec.parameters)
        function_name = _json_lit(spec.name)
        body = (
            f'"{{" ws {_json_lit("function")} ws ":" ws {function_name}'
            f' ws "," ws {_json_lit("params")} ws ":" ws {params} ws "}}"'
        )
        return self.add(name, body)

    def schema(self, name: str, schema: Any) -> str:
        """A rule (or primitive rule name) matching one value of `schema`."""
        if not isinstance(schema, Mapping):
            return "value"
        if "const" in schema:
            return self.add(name, _json_lit(schema["const"]))
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self.add(name, " | ".join(_json_lit(v) for v in enum))
        for combinator in ("anyOf", "oneOf"):
            options = schema.get(combinator)
            if isinstance(options, list) and options:
                alts = [self.schema(f"{name}-{i}", option) for i, option in enumerate(options)]
                return self.add(name, " | ".join(alts))
        kind = schema.get("type")
        if isinstance(kind, list):
            alts = [self.schema(f"{name}-{i}", {**schema, "type": k}) for i, k in enumerate(kind)]
            return self.add(name, " | ".join(alts)) if alts else "value"
        if kind in _TYPE_RULES:
            return _TYPE_RULES[str(kind)]
        if kind == "array":
            item = self.schema(f"{name}-item", schema.get("items"))
            return self.add(name, f'"[" ws ( {item} ( ws "," ws {item} )* )? ws "]"')
        if kind == "object" or "properties" in schema:
            return self.object_schema(name, schema)
        return "value"

    def object_schema(self, name: str, schema: Mapping[str, Any]) -> str:
        props = schema.get("properties")
        if not isinstance(props, Mapping) or not props:
            return (
                "object"
                if schema.get("additionalProperties", True) is not False
                else self.add(name, '"{" ws "}"')
            )
        required_raw = schema.get("required")
        required = set(required_raw) if isinstance(required_raw, list) else set()
        members: list[tuple[str, bool]] = []
        for i, (key, sub) in enumerate(props.items()):
            value = self.schema(f"{name}-{i}", sub)
            members.append(
                (f'{_lit(json.dumps(key, ensure_ascii=False))} ws ":" ws {value}', key in required)
            )
        body = self._sequence(name, members)
        return self.add(name, f'"{{" ws {body} ws "}}"')

    def _sequence(self, name: str, members: list[tuple[str, bool]]) -> str:
        """Members in order, optional ones skippable, commas only between members present.

        State rules: `NAME-sK-open` (nothing emitted yet) and `NAME-sK-more` (something was);
        generated only when reachable, so the grammar stays linear in the number of members.
        """
        made: set[str] = set()

        def join(*parts: str | None) -> str:
            return " ".join(p for p in parts if p)

        def state(k: int, emitted: bool) -> str | None:
            if k == len(members):
                return None
            rule = f"{name}-s{k}-{'more' if emitted else 'open'}"
            if rule in made:
                return rule
            made.add(rule)
            member, is_required = members[k]
            head = f'ws "," ws {member}' if emitted else member
            after = state(k + 1, True)
            if is_required:
                self.add(rule, join(head, after))
            elif emitted:
                self.add(rule, join(f"( {head} )?", after))
            else:
                skipped = state(k + 1, False)
                taken = join(head, after)
                self.add(rule, f"{taken} | {skipped}" if skipped else f"( {taken} )?")
            return rule

        first = state(0, False)
        assert first is not None  # members is never empty here
        return first


def _lit(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_lit(value: Any) -> str:
    return _lit(json.dumps(value, ensure_ascii=False))
