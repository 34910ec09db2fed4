"""Re-serialize tool-call arguments that the gateway edited, without changing any number.

orjson reads integers beyond 64 bits as floats, so when the parsed arguments hold a float (rare)
the standard library, which keeps integers exact, re-reads the original text and the same edit is
applied to that copy. orjson also writes at most 255 levels (it reads 1,024): deeper, the
standard library writes them. May raise RecursionError (nested past what the standard library
takes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def has_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere (iterative: arguments may nest deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def dump_exact(original: str, edited: Any, edit: Callable[[Any], object]) -> str:
    """`edited` (the parsed `original` after `edit`) as compact JSON, numbers as written."""
    if has_float(edited):
        exact = json.loads(original)
        edit(exact)
        return json.dumps(exact, ensure_ascii=False, separators=(",", ":"))
    try:
        return orjson.dumps(edited).decode()
    except TypeError:  # "Recursion limit reached"
        return json.dumps(edited, ensure_ascii=False, separators=(",", ":"))
