"""Proto messages and function definitions to OpenAI chat-completions JSON.

Function schemas arrive as `google.protobuf.Struct`, which loses two things JSON had:
- integers: every number is a double, so integral values (e.g. `minItems: 1.0`) become ints again;
- key order: upb iterates map fields in a per-process randomized order. To send the same bytes
  from every worker (upstream prompt caching keys on the prompt prefix), objects are emitted
  with sorted keys, except `properties`, which follow the schema's `required` order and then
  the remaining names sorted: required-first is how tool schemas are usually written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core.tools import accepts_developer_role
from server.errors import FieldViolation, InvalidRequest

if TYPE_CHECKING:
    from server.core.validation import MessageFields

_ROLE_NAMES: dict[int, str] = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_DEVELOPER: "developer",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}
_ASSISTANT = chat_pb2.ROLE_ASSISTANT
_TOOL = chat_pb2.ROLE_TOOL
_SYSTEM = chat_pb2.ROLE_SYSTEM
_MAX_EXACT_INT = 2.0**53


def _invalid(field: str, description: str, **metadata: object) -> InvalidRequest:
    return InvalidRequest(
        f"{field} {description}",
        metadata={"field": field, **metadata},
        field_violations=[FieldViolation(field, description)],
    )


def to_openai_messages(
    messages: Sequence[chat_pb2.Message],
    *,
    model: str,
    system_role: str | None = None,
    read: Sequence[MessageFields] | None = None,
) -> list[dict[str, Any]]:
    """The `messages` array for `model`; raises InvalidRequest naming the offending field.

    `system_role`: the role of system messages for `model`, if the caller already knows it.
    `read`: `messages`' fields as `validation.validate_request` returned them (the same messages,
    unchanged since), instead of reading them from the protos again."""
    if system_role is None:
        system_role = "developer" if accepts_developer_role(model) else "system"
    out: list[dict[str, Any]] = []
    append = out.append
    item: Any  # a message, or its MessageFields
    m: chat_pb2.Message
    content: Any
    for i, item in enumerate(messages if read is None else read):
        if read is None:  # read here (no tuple per message: this path is the stream's and others')
            m = item
            role_value = m.role
            content = m.content
            parts = m.parts
        else:
            m, role_value, content, parts = item
        if role_value == _SYSTEM:
            role = system_role
        else:
            name = _ROLE_NAMES.get(role_value)
            if name is None:
                raise _invalid(f"messages[{i}].role", "must be one of the ROLE_* values", role=role_value)
            role = name
        if parts:
            content = _parts(content, parts, i)
        d: dict[str, Any] = {"role": role, "content": content}
        if role_value == _ASSISTANT:
            if m.tool_calls:
                d["tool_calls"] = _tool_calls(m, i)
                if not content:
                    d["content"] = None
            if m.thinking_blocks:
                d["thinking_blocks"] = [thinking_block_json(b) for b in m.thinking_blocks]
            if m.reasoning_content:
                # Only DeepSeek's thinking mode takes it back (server.providers.deepseek); every
                # other provider's build_body leaves it out.
                d["reasoning_content"] = m.reasoning_content
        elif role_value == _TOOL:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        append(d)
    return out


def _parts(text: str, content_parts: Sequence[chat_pb2.ContentPart], i: int) -> list[dict[str, Any]]:
    """A message's content and parts (`text`, `content_parts`) as a content array."""
    parts: list[dict[str, Any]] = []
    if text:
        parts.append({"type": "text", "text": text})
    for k, p in enumerate(content_parts):
        which = p.WhichOneof("part")
        if which == "text":
            parts.append({"type": "text", "text": p.text})
        elif which == "image_url":
            img = p.image_url
            if not img.url:
                raise _invalid(f"messages[{i}].parts[{k}].image_url.url", "must not be empty")
            image: dict[str, str] = {"url": img.url}
            if img.detail:
                image["detail"] = img.detail
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _invalid(f"messages[{i}].parts[{k}]", "sets neither text nor image_url")
    return parts


def _tool_calls(m: chat_pb2.Message, i: int) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for j, tc in enumerate(m.tool_calls):
        args = tc.arguments
        try:
            orjson.loads(args)
        except orjson.JSONDecodeError:
            raise _invalid(
                f"messages[{i}].tool_calls[{j}].arguments", "is not valid JSON", tool_call_id=tc.id
            ) from None
        call: dict[str, Any] = {
            "id": tc.id,
            "type": "function",
            "function": {"name": tc.name, "arguments": args},
        }
        if tc.thought_signature:
            call["thought_signature"] = tc.thought_signature
        calls.append(call)
    return calls


def thinking_block_json(block: chat_pb2.ThinkingBlock) -> dict[str, Any]:
    """A ThinkingBlock as the provider-native dict the translators take (inverse of
    `thinking_block_into`): `text` is Anthropic's `thinking`; empty fields are left out, except
    that a thinking block always has its text and signature (Anthropic requires both)."""
    out: dict[str, Any] = {"type": block.type}
    thinking = block.type == "thinking"
    if block.text or thinking:
        out["thinking"] = block.text
    if block.signature or thinking:
        out["signature"] = block.signature
    if block.data:
        out["data"] = block.data
    return out


def thinking_block_into(out: chat_pb2.ThinkingBlock, block: dict[str, Any]) -> None:
    """A translator's thinking-block dict into its proto form (values of other types dropped)."""
    # The type too: as its str() a list there was text the answer cap never counts (it counts a
    # block's string values, `answer_bytes`).
    kind = block.get("type")
    if isinstance(kind, str):
        out.type = kind
    for key, attribute in (("thinking", "text"), ("signature", "signature"), ("data", "data")):
        value = block.get(key)
        if isinstance(value, str):
            setattr(out, attribute, value)


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() and -_MAX_EXACT_INT <= n <= _MAX_EXACT_INT else n
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as JSON-ready dict: ints restored, keys in canonical order (see module doc)."""
    fields = s.fields
    d = {k: _value(fields[k]) for k in sorted(fields)}
    props = d.get("properties")
    if isinstance(props, dict) and props:
        required = d.get("required")
        if isinstance(required, list) and required:
            # `required` is client input: anything but strings naming properties is ignored.
            order = [k for k in dict.fromkeys(r for r in required if isinstance(r, str)) if k in props]
            if order:
                seen = set(order)
                order.extend(k for k in props if k not in seen)  # already sorted
                d["properties"] = {k: props[k] for k in order}
    return d


def function_to_dict(fn: chat_pb2.FunctionDefinition, index: int = 0) -> dict[str, Any]:
    """`{name, description, parameters}`; a function without parameters takes none."""
    if not fn.name:
        raise _invalid(f"functions[{index}].name", "must not be empty")
    if fn.HasField("parameters") and fn.parameters.fields:
        parameters = struct_to_dict(fn.parameters)
    else:
        parameters = {"type": "object", "properties": {}}
    return {"name": fn.name, "description": fn.description, "parameters": parameters}


def functions_to_dicts(functions: Sequence[chat_pb2.FunctionDefinition]) -> list[dict[str, Any]]:
    """Every function as a dict (fresh objects; the request path uses the cached ones)."""
    return [function_to_dict(fn, i) for i, fn in enumerate(functions)]
