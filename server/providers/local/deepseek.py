"""DeepSeek-R1 models: the functions and the answer format go into the system prompt, on a copy.

The seed appended to the caller's own system message (mutating it), concatenated the function
JSON without separators, and crashed without functions. Here the caller's list and dicts are
never touched, each function is one JSON line, and without functions nothing is added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from server.providers.local.functions import normalize_functions

DEEPSEEK_R1_MARKER = "deepseek-r1"
ANSWER_INSTRUCTION = (
    "Select the best function to call and answer with a single JSON block with the keys "
    '"function" and "params". Use double quotes around keys and string values.'
)


def is_deepseek_r1(model: str) -> bool:
    """Whether the model name names a DeepSeek-R1 model (case-insensitive)."""
    return DEEPSEEK_R1_MARKER in model.lower()


def functions_block(functions: Sequence[Mapping[str, Any]]) -> str:
    """The functions as JSON inside `<available functions>`, plus the answer instruction."""
    lines = [json.dumps(spec.as_dict(), ensure_ascii=False) for spec in normalize_functions(functions)]
    return "<available functions>\n" + "\n".join(lines) + "\n</available functions>\n" + ANSWER_INSTRUCTION


def with_functions_in_system_prompt(
    messages: Sequence[Mapping[str, Any]], functions: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A copy of `messages` whose system message also lists `functions` (a new one if none)."""
    copied = [dict(m) for m in messages]
    if not functions:
        return copied
    block = functions_block(functions)
    if copied and copied[0].get("role") in ("system", "developer"):
        system = copied[0]
        content = system.get("content")
        if isinstance(content, list):
            system["content"] = [*content, {"type": "text", "text": block}]
        else:
            text = content if isinstance(content, str) else ""
            system["content"] = f"{text.rstrip()}\n\n{block}" if text.strip() else block
    else:
        copied.insert(0, {"role": "system", "content": block})
    return copied
