"""Prompt wrappers: OpenAI chat messages and functions rendered into one prompt for a local model.

Wrappers: `chatml` (the default, also for an empty name) and `llama3`, each with a `-grammar`
variant that renders identically and additionally asks for a GBNF grammar (see `grammar.py`).

The model is asked to answer with one JSON object, `{"function": NAME, "params": {...}}`, the
same shape as earlier tool calls are rendered in the conversation. Tool results are rendered as
an assistant turn starting with `FUNCTION RETURN:` (a default stop string, so a model that starts
inventing results is cut off). With `first_message` (and a `send_message` function), the prompt
ends primed with `{"function": "send_message",`; `first_message_prefix` gives that text so the
parser can put it back in front of the completion.

ChatML turns:    <|im_start|>ROLE\\nTEXT<|im_end|>\\n ... <|im_start|>assistant\\n
Llama 3 turns:   <|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|> ...
                 <|start_header_id|>assistant<|end_header_id|>\\n\\n

No wrapper writes a BOS (`<|begin_of_text|>`): every local server adds the model's own BOS when
it tokenizes a prompt (llama.cpp by the GGUF's `add_bos_token`, vLLM's tokenizer by default,
Ollama, koboldcpp and the web UI as llama.cpp), so one written here was a second one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from server.core.inner_thoughts import INNER_THOUGHTS_KWARG, LEGACY_INNER_THOUGHTS_KWARG
from server.errors import FieldViolation, InvalidRequest
from server.providers.local import lenient_json
from server.providers.local.functions import (
    FunctionSpec,
    normalize_functions,
    specs_for_prompt,
)

DEFAULT_WRAPPER = "chatml"
WRAPPERS = ("chatml", "llama3")
GRAMMAR_SUFFIX = "-grammar"
FIRST_MESSAGE_FUNCTION = "send_message"
FIRST_MESSAGE_PRIME = '{"function": "send_message",'
FUNCTION_RETURN_PREFIX = "FUNCTION RETURN:\n"

DEFAULT_STOP_STRINGS: tuple[str, ...] = (
    "\nUSER:",
    "\nASSISTANT:",
    "\nFUNCTION RETURN:",
    "<|im_start|>",
    "<|im_end|>",
    "\n### ",
)
_WRAPPER_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "chatml": (),
    "llama3": ("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
}

FUNCTION_BLOCK_INTRO = (
    "Choose the one function below that best continues the conversation and call it. "
    'Answer with a single JSON object and nothing else: {"function": "<function name>", '
    '"params": {<arguments>}}, using double quotes.'
)


def resolve_wrapper(wrapper: str) -> str:
    """The base wrapper (`chatml` or `llama3`) a wrapper name renders with; InvalidRequest if unknown."""
    name = wrapper.strip().lower()
    if name.endswith(GRAMMAR_SUFFIX):
        name = name[: -len(GRAMMAR_SUFFIX)]
    if not name:
        return DEFAULT_WRAPPER
    if name not in WRAPPERS:
        known = ", ".join(f"{w}, {w}{GRAMMAR_SUFFIX}" for w in WRAPPERS)
        description = f"unknown prompt wrapper {wrapper!r}; known wrappers: {known}"
        raise InvalidRequest(
            description,
            field_violations=[FieldViolation(field="llm_config.model_wrapper", description=description)],
        )
    return name


def wrapper_uses_grammar(wrapper: str) -> bool:
    """Whether the wrapper asks for a GBNF grammar (the `-grammar` variants)."""
    resolve_wrapper(wrapper)
    return wrapper.strip().lower().endswith(GRAMMAR_SUFFIX)


def stop_strings(wrapper: str) -> list[str]:
    """The default stop strings for a wrapper."""
    return [*DEFAULT_STOP_STRINGS, *_WRAPPER_STOP_STRINGS[resolve_wrapper(wrapper)]]


def first_message_prefix(functions: Sequence[Mapping[str, Any]], *, first_message: bool) -> str:
    """The text the prompt is primed with ("" unless first_message and `send_message` exists)."""
    if not first_message:
        return ""
    names = {spec.name for spec in normalize_functions(functions)}
    return FIRST_MESSAGE_PRIME if FIRST_MESSAGE_FUNCTION in names else ""


def render_prompt(
    wrapper: str,
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]],
    *,
    first_message: bool,
    put_inner_thoughts_in_kwargs: bool,
    put_inner_thoughts_first: bool = True,
) -> str:
    """Render the conversation and the functions into one prompt ending with the assistant's turn."""
    base = resolve_wrapper(wrapper)
    specs = specs_for_prompt(
        functions,
        put_inner_thoughts_in_kwargs=put_inner_thoughts_in_kwargs,
        put_inner_thoughts_first=put_inner_thoughts_first,
    )
    turn: Callable[[str, str], str] = _chatml_turn if base == "chatml" else _llama3_turn
    parts: list[str] = []  # no BOS: the server adds it (see the module docstring)

    function_block = render_function_block(specs)
    rest = list(enumerate(messages))
    if rest and rest[0][1].get("role") in ("system", "developer"):
        _, first = rest.pop(0)
        system_text = _text_content(first, 0)
        parts.append(turn("system", _join_blocks(system_text, function_block)))
    elif function_block:
        parts.append(turn("system", function_block))

    for index, message in rest:
        role = message.get("role")
        if role in ("system", "developer"):
            parts.append(turn("system", _text_content(message, index)))
        elif role == "user":
            parts.append(turn("user", _text_content(message, index)))
        elif role == "assistant":
            parts.append(
                turn(
                    "assistant",
                    _assistant_text(
                        message,
                        index,
                        put_inner_thoughts_in_kwargs=put_inner_thoughts_in_kwargs,
                        put_inner_thoughts_first=put_inner_thoughts_first,
                    ),
                )
            )
        elif role in ("tool", "function"):
            parts.append(turn("assistant", FUNCTION_RETURN_PREFIX + _text_content(message, index)))
        else:
            description = f"role {role!r} cannot be rendered for a local model"
            raise InvalidRequest(
                description,
                field_violations=[FieldViolation(field=f"messages[{index}].role", description=description)],
            )

    opener = (
        "<|im_start|>assistant\n" if base == "chatml" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    parts.append(opener + first_message_prefix(functions, first_message=first_message))
    return "".join(parts)


def render_function_block(specs: Sequence[FunctionSpec]) -> str:
    """The instruction and the list of functions with their descriptions and parameters."""
    if not specs:
        return ""
    lines = [FUNCTION_BLOCK_INTRO, "Available functions:"]
    for spec in specs:
        lines.append(f"{spec.name}: {spec.description}".rstrip())
        props = spec.properties
        if not props:
            lines.append("  params: none")
            continue
        lines.append("  params:")
        required = set(spec.required)
        for name, schema in props.items():
            schema = schema if isinstance(schema, Mapping) else {}
            kind = describe_type(schema)
            flag = ", required" if name in required else ""
            line = f"    {name} ({kind}{flag})"
            description = schema.get("description")
            if isinstance(description, str) and description.strip():
                line += f": {' '.join(description.split())}"
            enum = schema.get("enum")
            if isinstance(enum, list) and enum:
                line += " One of: " + ", ".join(json.dumps(v, ensure_ascii=False) for v in enum) + "."
            lines.append(line)
    return "\n".join(lines)


def describe_type(schema: Mapping[str, Any]) -> str:
    """A short human description of a JSON schema's type, e.g. `array of string`."""
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind) or "any"
    if kind == "array":
        items = schema.get("items")
        return f"array of {describe_type(items)}" if isinstance(items, Mapping) else "array"
    if isinstance(kind, str):
        return kind
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            return " or ".join(describe_type(o) if isinstance(o, Mapping) else "any" for o in options)
    if "enum" in schema:
        return "enum"
    return "any"


def render_function_call(name: str, params: Mapping[str, Any]) -> str:
    """A function call exactly as the model is asked to write it."""
    return json.dumps({"function": name, "params": dict(params)}, ensure_ascii=False)


def _chatml_turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text.strip()}<|im_end|>\n"


def _llama3_turn(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"


def _join_blocks(*blocks: str) -> str:
    return "\n\n".join(b.strip() for b in blocks if b.strip())


def _text_content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                description = "local models take text only; this message has a non-text part"
                raise InvalidRequest(
                    description,
                    field_violations=[
                        FieldViolation(field=f"messages[{index}].content", description=description)
                    ],
                )
        return "\n".join(texts)
    description = "message content must be a string or a list of text parts"
    raise InvalidRequest(
        description,
        field_violations=[FieldViolation(field=f"messages[{index}].content", description=description)],
    )


def _assistant_text(
    message: Mapping[str, Any],
    index: int,
    *,
    put_inner_thoughts_in_kwargs: bool,
    put_inner_thoughts_first: bool,
) -> str:
    content = _text_content(message, index).strip()
    calls: list[tuple[str, str, str]] = []  # (field path, name, arguments)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for j, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping):
                continue
            calls.append((f"messages[{index}].tool_calls[{j}].function", *_name_and_arguments(function)))
    legacy = message.get("function_call")
    if not calls and isinstance(legacy, Mapping):
        calls.append((f"messages[{index}].function_call", *_name_and_arguments(legacy)))
    if not calls:
        return content

    rendered: list[str] = []
    thoughts_pending = put_inner_thoughts_in_kwargs and bool(content)
    if content and not put_inner_thoughts_in_kwargs:
        rendered.append(content)
    for path, name, arguments in calls:
        params = _arguments_object(arguments, path)
        if (
            thoughts_pending
            and INNER_THOUGHTS_KWARG not in params
            and LEGACY_INNER_THOUGHTS_KWARG not in params
        ):
            thinking = {INNER_THOUGHTS_KWARG: content}
            params = {**thinking, **params} if put_inner_thoughts_first else {**params, **thinking}
        thoughts_pending = False  # the monologue goes with the first call only
        rendered.append(render_function_call(name, params))
    return "\n".join(rendered)


def _name_and_arguments(function: Mapping[str, Any]) -> tuple[str, str]:
    name = function.get("name")
    arguments = function.get("arguments")
    return (name if isinstance(name, str) else ""), (arguments if isinstance(arguments, str) else "")


def _arguments_object(arguments: str, path: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = lenient_json.loads(arguments)
    except lenient_json.LenientJSONError as exc:
        description = f"tool call arguments are not JSON: {exc}"
        raise InvalidRequest(
            description, field_violations=[FieldViolation(field=f"{path}.arguments", description=description)]
        ) from exc
    if not isinstance(value, dict):
        description = "tool call arguments must be a JSON object"
        raise InvalidRequest(
            description, field_violations=[FieldViolation(field=f"{path}.arguments", description=description)]
        )
    return value
