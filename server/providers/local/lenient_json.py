"""A forgiving JSON reader for what local models write.

`decode_at` first tries the standard decoder (with raw control characters allowed inside
strings); when that fails it reads with repairs for the breakage models commonly produce:

- trailing or doubled commas, a missing comma between members;
- missing closing quotes, braces and brackets at the end of the text (truncated output);
- a `]` where `}` was due and the reverse (the open container is closed);
- raw newlines and tabs inside strings; `\\_` for `_`; unknown escapes kept as written;
- single-quoted strings and unquoted keys, Python `True` / `False` / `None`;
- an unescaped `"` inside a string, when what follows it cannot end the string.

Nothing is ever evaluated: Python-ish input is only read as data.
"""

from __future__ import annotations

import json
import re
from typing import Any

_WS = " \t\r\n"
_MAX_DEPTH = 64
_NUMBER = re.compile(r"-?(?:\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERALS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "'": "'",
    "_": "_",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_STRICT = json.JSONDecoder(strict=False)


class LenientJSONError(ValueError):
    """The text cannot be read as JSON, even with repairs; `offset`: how far the reading got."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Truncated(Exception):
    """The text ended where a value was due."""


def decode_at(text: str, start: int = 0) -> tuple[Any, int, bool]:
    """Read one JSON value at `start`: (value, end index, whether repairs were needed)."""
    try:
        value, end = _STRICT.raw_decode(text, start)
        return value, end, False
    except json.JSONDecodeError:
        pass
    reader = _Reader(text, start)
    try:
        value = reader.value(0)
    except _Truncated as exc:
        raise LenientJSONError("the text ends before a value", len(text)) from exc
    except RecursionError as exc:  # pragma: no cover - bounded by _MAX_DEPTH
        raise LenientJSONError("nested too deeply", reader.pos) from exc
    return value, reader.pos, True


def loads(text: str) -> Any:
    """Read a whole text as one JSON value (repairs allowed; trailing whitespace only)."""
    value, end, _ = decode_at(text, _skip_ws(text, 0))
    if text[end:].strip():
        raise LenientJSONError(f"unexpected text after the value at offset {end}", end)
    return value


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


class _Reader:
    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos
        self.n = len(text)

    def _ws(self) -> None:
        self.pos = _skip_ws(self.text, self.pos)

    def _error(self, what: str) -> LenientJSONError:
        return LenientJSONError(f"{what} at offset {self.pos}", self.pos)

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self._error("nested too deeply")
        self._ws()
        if self.pos >= self.n:
            raise _Truncated
        c = self.text[self.pos]
        if c == "{":
            return self._object(depth)
        if c == "[":
            return self._array(depth)
        if c in "\"'":
            return self._string(c, key=False)
        if c == "-" or c.isdigit():
            return self._number()
        match = _WORD.match(self.text, self.pos)
        if match:
            word = match.group()
            if word in _LITERALS:
                self.pos = match.end()
                return _LITERALS[word]
            if match.end() == self.n and any(lit.startswith(word) for lit in _LITERALS):
                self.pos = self.n
                raise _Truncated
        raise self._error(f"unexpected {c!r}")

    def _number(self) -> Any:
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            if self.text[self.pos :] == "-":
                self.pos = self.n
                raise _Truncated
            raise self._error("malformed number")
        self.pos = match.end()
        token = match.group()
        if any(ch in token for ch in ".eE"):
            return float(token)
        return int(token)

    def _object(self, depth: int) -> dict[str, Any]:
        self.pos += 1
        result: dict[str, Any] = {}
        while True:
            self._ws()
            if self.pos >= self.n:
                return result
            c = self.text[self.pos]
            if c == "}":
                self.pos += 1
                return result
            if c == "]":  # mismatched closer: close this object, leave the bracket to the array
                return result
            if c == ",":
                self.pos += 1
                continue
            if c in "\"'":
                key = self._string(c, key=True)
            else:
                match = _WORD.match(self.text, self.pos)
                if not match:
                    raise self._error(f"expected a key, found {c!r}")
                key = match.group()
                self.pos = match.end()
            self._ws()
            if self.pos >= self.n:
                return result
            if self.text[self.pos] not in ":=":
                raise self._error(f"expected ':' after key {key!r}")
            self.pos += 1
            try:
                result[key] = self.value(depth + 1)
            except _Truncated:
                return result
            self._ws()
            if self.pos >= self.n:
                return result
            c = self.text[self.pos]
            if c == ",":
                self.pos += 1
            elif c == "}":
                self.pos += 1
                return result
            elif c == "]":
                return result
            elif c not in "\"'":  # a quote here is a missing comma before the next key
                raise self._error(f"expected ',' or '}}', found {c!r}")

    def _array(self, depth: int) -> list[Any]:
        self.pos += 1
        result: list[Any] = []
        while True:
            self._ws()
            if self.pos >= self.n:
                return result
            c = self.text[self.pos]
            if c == "]":
                self.pos += 1
                return result
            if c == "}":
                return result
            if c == ",":
                self.pos += 1
                continue
            try:
                result.append(self.value(depth + 1))
            except _Truncated:
                return result
            self._ws()
            if self.pos >= self.n:
                return result
            c = self.text[self.pos]
            if c == ",":
                self.pos += 1
            elif c == "]":
                self.pos += 1
                return result
            elif c == "}":
                return result
            elif c not in "\"'{[":
                raise self._error(f"expected ',' or ']', found {c!r}")

    def _string(self, quote: str, *, key: bool) -> str:
        text, n = self.text, self.n
        self.pos += 1
        out: list[str] = []
        while self.pos < n:
            c = text[self.pos]
            if c == "\\":
                if self.pos + 1 >= n:
                    self.pos = n
                    break
                self._escape(out)
                continue
            if c == quote and self._closes(key):
                self.pos += 1
                return "".join(out)
            out.append(c)
            self.pos += 1
        return "".join(out)  # truncated: keep what was written

    def _escape(self, out: list[str]) -> None:
        text = self.text
        e = text[self.pos + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            self.pos += 2
            return
        if e == "u":
            code = _hex4(text, self.pos + 2)
            if code is not None:
                self.pos += 6
                if 0xD800 <= code < 0xDC00 and text.startswith("\\u", self.pos):
                    low = _hex4(text, self.pos + 2)
                    if low is not None and 0xDC00 <= low < 0xE000:
                        self.pos += 6
                        out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                        return
                out.append(chr(code))
                return
        # Not a JSON escape (e.g. a regex the model quoted): keep it as written.
        out.append("\\" + e)
        self.pos += 2

    def _closes(self, key: bool) -> bool:
        """Whether the quote at `pos` ends the string, judged by what follows it."""
        after = self.pos + 1
        nxt = _skip_ws(self.text, after)
        if nxt >= self.n:
            return True
        c = self.text[nxt]
        if key:
            return c in ":=,}"
        if c in ",}]":
            return True
        # `"a": "x"\n  "b": ...` is a missing comma, not a quote inside the string.
        return c in "\"'" and "\n" in self.text[after:nxt]


def _hex4(text: str, pos: int) -> int | None:
    chunk = text[pos : pos + 4]
    if len(chunk) == 4 and all(ch in "0123456789abcdefABCDEF" for ch in chunk):
        return int(chunk, 16)
    return None
