"""The GBNF grammars, checked by a small recognizer for the GBNF subset the builder emits."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from server.errors import InvalidRequest
from server.providers.local.grammar import build_grammar, wrapper_uses_grammar

# --- a tiny GBNF recognizer: literals, classes, refs, groups, |, ?, *, + -------------------------

Node = tuple[Any, ...]
_ESC = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "]": "]", "[": "[", "-": "-", "^": "^"}


@dataclass
class Grammar:
    rules: dict[str, Node]

    def matches(self, text: str, start: str = "root") -> bool:
        @cache
        def rule(name: str, pos: int) -> frozenset[int]:
            return frozenset(match(self.rules[name], pos))

        def match(node: Node, pos: int) -> set[int]:
            kind = node[0]
            if kind == "lit":
                return {pos + len(node[1])} if text.startswith(node[1], pos) else set()
            if kind == "cls":
                if pos >= len(text):
                    return set()
                ch = text[pos]
                inside = any(lo <= ch <= hi for lo, hi in node[2])
                return {pos + 1} if inside != node[1] else set()
            if kind == "ref":
                return set(rule(node[1], pos))
            if kind == "seq":
                ends = {pos}
                for item in node[1]:
                    ends = {e for p in ends for e in match(item, p)}
                return ends
            if kind == "alt":
                return {e for option in node[1] for e in match(option, pos)}
            if kind in ("star", "plus", "opt"):
                first = match(node[1], pos)
                if kind == "opt":
                    return first | {pos}
                seen, frontier = set(first), set(first)
                while frontier:
                    frontier = {e for p in frontier for e in match(node[1], p)} - seen
                    seen |= frontier
                return seen | {pos} if kind == "star" else seen
            raise AssertionError(node)

        return len(text) in rule(start, 0)


def parse_gbnf(source: str) -> Grammar:
    rules: dict[str, Node] = {}
    for line in source.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, body = line.partition(" ::= ")
        assert re.fullmatch(r"[a-z0-9-]+", name), f"bad rule name {name!r}"
        assert name not in rules, f"rule {name} defined twice"
        node, pos = _alt(body, 0)
        assert body[pos:].strip() == "", f"trailing text in rule {name}: {body[pos:]!r}"
        rules[name] = node
    refs = set(re.findall(r"'ref', '([a-z0-9-]+)'", repr(rules)))
    assert refs <= rules.keys(), f"undefined rules: {refs - rules.keys()}"
    return Grammar(rules)


def _skip(body: str, pos: int) -> int:
    while pos < len(body) and body[pos] == " ":
        pos += 1
    return pos


def _alt(body: str, pos: int) -> tuple[Node, int]:
    options: list[Node] = []
    while True:
        seq, pos = _seq(body, pos)
        options.append(seq)
        pos = _skip(body, pos)
        if pos < len(body) and body[pos] == "|":
            pos += 1
            continue
        return ("alt", options), pos


def _seq(body: str, pos: int) -> tuple[Node, int]:
    items: list[Node] = []
    while True:
        pos = _skip(body, pos)
        if pos >= len(body) or body[pos] in "|)":
            return ("seq", items), pos
        item, pos = _atom(body, pos)
        if pos < len(body) and body[pos] in "?*+":
            item = ({"?": "opt", "*": "star", "+": "plus"}[body[pos]], item)
            pos += 1
        items.append(item)


def _atom(body: str, pos: int) -> tuple[Node, int]:
    c = body[pos]
    if c == '"':
        out: list[str] = []
        pos += 1
        while body[pos] != '"':
            if body[pos] == "\\":
                e = body[pos + 1]
                if e == "x":
                    out.append(chr(int(body[pos + 2 : pos + 4], 16)))
                    pos += 4
                    continue
                out.append(_ESC[e])
                pos += 2
            else:
                out.append(body[pos])
                pos += 1
        return ("lit", "".join(out)), pos + 1
    if c == "[":
        pos += 1
        negate = body[pos] == "^"
        pos += negate
        chars: list[str] = []
        while body[pos] != "]":
            if body[pos] == "\\" and body[pos + 1] == "x":
                chars.append(chr(int(body[pos + 2 : pos + 4], 16)))
                pos += 4
            elif body[pos] == "\\":
                chars.append(_ESC[body[pos + 1]])
                pos += 2
            else:
                chars.append(body[pos])
                pos += 1
        ranges: list[tuple[str, str]] = []
        i = 0
        while i < len(chars):
            if i + 2 < len(chars) and chars[i + 1] == "-":
                ranges.append((chars[i], chars[i + 2]))
                i += 3
            else:
                ranges.append((chars[i], chars[i]))
                i += 1
        return ("cls", negate, ranges), pos + 1
    if c == "(":
        node, pos = _alt(body, pos + 1)
        pos = _skip(body, pos)
        assert body[pos] == ")"
        return node, pos + 1
    m = re.compile(r"[a-z0-9-]+").match(body, pos)
    assert m, f"unexpected {body[pos:]!r}"
    return ("ref", m.group()), m.end()


# --- the functions under test ---------------------------------------------------------------------

SEND_MESSAGE: dict[str, Any] = {
    "name": "send_message",
    "description": "Sends a message to the human user.",
    "parameters": {
        "type": "object",
        "properties": {"message": {"type": "string"}},
        "required": ["message"],
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "conversation_search",
        "description": "Search the conversation.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "page": {"type": ["integer", "null"]},
                "roles": {"type": "array", "items": {"type": "string", "enum": ["user", "assistant"]}},
                "filters": {
                    "type": "object",
                    "properties": {
                        "after": {"type": "string"},
                        "limit": {"type": "number"},
                        "exact": {"type": "boolean"},
                    },
                    "required": ["exact"],
                },
                "tone": {"enum": ['say "hi"', "plain", 3]},
                "extra": {"description": "anything goes"},
            },
            "required": ["query"],
        },
    },
}
NO_REQUIRED: dict[str, Any] = {
    "name": "pause_heartbeats",
    "description": "Pause.",
    "parameters": {
        "type": "object",
        "properties": {"minutes": {"type": "integer"}, "why": {"type": "string"}},
    },
}
NO_PARAMS: dict[str, Any] = {"name": "ping", "description": "Ping.", "parameters": {}}
FUNCTIONS = [SEND_MESSAGE, SEARCH, NO_REQUIRED, NO_PARAMS]


def grammar(**kwargs: Any) -> Grammar:
    options: dict[str, Any] = {"put_inner_thoughts_in_kwargs": False}
    options.update(kwargs)
    return parse_gbnf(build_grammar(options.pop("functions", FUNCTIONS), **options))


def call(name: str, params: dict[str, Any], *, indent: int | None = None) -> str:
    return json.dumps({"function": name, "params": params}, indent=indent)


def test_structure() -> None:
    source = build_grammar(FUNCTIONS, put_inner_thoughts_in_kwargs=True)
    assert source.startswith("root ::= ws ( f0 | f1 | f2 | f3 )\n")
    assert 'f0 ::= "{" ws "\\"function\\"" ws ":" ws "\\"send_message\\""' in source
    assert "string ::=" in source and 'ws ::= ( " " | "\\n" ( [ \\t]' in source
    parse_gbnf(source)  # every rule well formed, every reference defined


def test_whitespace_and_numbers_are_bounded() -> None:
    """Issue 14: `ws ::= [ \\t\\n]*` let a weak model spend 98% of 2,166 tokens on blanks.
    As llama.cpp's json.gbnf: one space, or one line break and at most 20 blanks; numbers of at
    most 16 integer and 16 fraction digits."""
    g = grammar()
    ok = '{"function":"send_message","params":{"message":"hi"}}'
    assert g.matches(ok)
    assert g.matches(ok.replace('"params":', '"params":\n' + " " * 20))
    assert not g.matches(ok.replace('"params":', '"params":\n' + " " * 21))
    assert not g.matches(ok.replace('"params":', '"params":  '))  # two spaces
    assert not g.matches(ok.replace('"params":', '"params":\n\n'))  # two line breaks
    assert g.matches(call("conversation_search", {"query": "q", "page": 10**15}))
    assert not g.matches(call("conversation_search", {"query": "q", "page": 10**16}))
    assert not g.matches(ok.replace("hi", "raw \x01 control character"))


@pytest.mark.parametrize(
    "text",
    [
        call("send_message", {"message": "Hi!"}),
        call("send_message", {"message": 'Line\\nbreak \\u00e9 "quoted"'}, indent=2),
        "\n" + call("send_message", {"message": ""}),
        call("conversation_search", {"query": "cats"}),
        call("conversation_search", {"query": "cats", "page": None, "roles": []}),
        call("conversation_search", {"query": "cats", "page": 2, "roles": ["user", "assistant"]}, indent=4),
        call("conversation_search", {"query": "q", "filters": {"exact": True}}),
        call(
            "conversation_search",
            {"query": "q", "filters": {"after": "2024", "limit": -1.5e3, "exact": False}},
        ),
        call("conversation_search", {"query": "q", "tone": 'say "hi"'}),
        call("conversation_search", {"query": "q", "tone": 3, "extra": {"any": [1, "thing", None]}}),
        call("pause_heartbeats", {}),
        call("pause_heartbeats", {"why": "tired"}),
        call("pause_heartbeats", {"minutes": 5, "why": "tired"}),
        call("ping", {}),
        call("ping", {"free": "form"}),
    ],
)
def test_valid_calls_match(text: str) -> None:
    assert grammar().matches(text), text


@pytest.mark.parametrize(
    "text",
    [
        call("send_mesage", {"message": "typo in the name"}),
        call("send_message", {}),
        call("send_message", {"message": 42}),
        call("send_message", {"message": "hi", "extra": 1}),
        '{"params": {"message": "hi"}, "function": "send_message"}',
        '{"function": "send_message", "params": {"message": "hi",}}',
        '{"function": "send_message", "params": {"message": "raw\nnewline"}}',
        "Sure! " + call("send_message", {"message": "hi"}),
        call("send_message", {"message": "hi"}) + " Done.",
        call("conversation_search", {"page": 1}),
        call("conversation_search", {"query": "q", "page": 1.5}),
        call("conversation_search", {"query": "q", "page": "1"}),
        call("conversation_search", {"query": "q", "roles": ["system"]}),
        call("conversation_search", {"query": "q", "filters": {"after": "x"}}),
        call("conversation_search", {"query": "q", "tone": "loud"}),
        call("conversation_search", {"page": 1, "query": "order matters"}),
        call("pause_heartbeats", {"why": "x", "minutes": 5}),
        call("pause_heartbeats", {"minutes": True}),
    ],
)
def test_invalid_calls_do_not_match(text: str) -> None:
    assert not grammar().matches(text), text


def test_inner_thoughts_are_required_first() -> None:
    g = grammar(put_inner_thoughts_in_kwargs=True)
    assert g.matches(call("send_message", {"thinking": "Greet.", "message": "Hi"}))
    assert g.matches(call("pause_heartbeats", {"thinking": "Rest."}))
    assert not g.matches(call("send_message", {"message": "Hi"}))
    assert not g.matches(call("send_message", {"message": "Hi", "thinking": "late"}))
    last = grammar(put_inner_thoughts_in_kwargs=True, put_inner_thoughts_first=False)
    assert last.matches(call("send_message", {"message": "Hi", "thinking": "late"}))


def test_first_message_grammar_continues_the_primed_prefix() -> None:
    g = grammar(put_inner_thoughts_in_kwargs=True, first_message=True)
    assert g.matches(' "params": {"thinking": "First contact.", "message": "Hello, I am Sam."}}')
    assert g.matches('\n  "params": {\n    "thinking": "x",\n    "message": "y"\n  }\n}')
    assert not g.matches(call("send_message", {"thinking": "x", "message": "y"}))
    assert not g.matches(' "params": {"thinking": "x", "query": "y"}}')
    # Without send_message there is no priming, so the full-call grammar is built.
    assert grammar(functions=[SEARCH], first_message=True).matches(
        call("conversation_search", {"query": "q"})
    )


def test_no_functions_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        build_grammar([], put_inner_thoughts_in_kwargs=True)
    assert [v.field for v in info.value.field_violations] == ["functions"]


def test_reexported_wrapper_flag() -> None:
    assert wrapper_uses_grammar("chatml-grammar")
    assert not wrapper_uses_grammar("llama3")


def test_recognizer_self_check() -> None:
    g = parse_gbnf('root ::= "a" ( "b" | [c-e] )* [^x]? "\\"" \nunused ::= "z"+')
    assert g.matches('abcde"') and g.matches('ay"') and g.matches('a"')
    assert not g.matches('ax"') and not g.matches("ab")
