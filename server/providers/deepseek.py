"""DeepSeek: the OpenAI Chat Completions dialect at `https://api.deepseek.com/v1`, Bearer auth.

Quirks handled here:
- `reasoning_content` of the history. DeepSeek's thinking mode (api-docs.deepseek.com, "Thinking
  Mode"; `deepseek-chat`/`deepseek-reasoner` are its aliases since V4) documents: between two
  user messages, when the model made tool calls, the reasoning_content of those assistant turns
  must be passed back in every later request (else 400 "The reasoning_content in the thinking
  mode must be passed back to the API"); between two user messages without tool calls it is
  ignored. So an assistant message keeps the reasoning_content the client returned
  (`Message.reasoning_content`) when its user-to-user segment has a tool call, and loses it
  elsewhere (noted: `messages[].reasoning_content`), where it would only cost tokens.
- `strict` on tool functions is dropped: DeepSeek takes strict tool schemas only on its beta base
  URL (`https://api.deepseek.com/beta`). The (strict-converted) schema itself is still sent.
- `response_format` json_schema: DeepSeek's JSON Output takes only `json_object`; a schema it
  would not enforce changes the answer's shape, so the request is INVALID_ARGUMENT.
- `deepseek-reasoner` ignores temperature, top_p and the penalties (documented: accepted, no
  effect): they are not sent, and noted, so the trace says they had no effect.
- Usage: `prompt_cache_hit_tokens` becomes `cached_tokens` (server.core.completion reads it when
  `prompt_tokens_details` is absent); `prompt_tokens` already includes hits and misses, so
  `prompt_cache_miss_tokens` needs no mapping.
"""

from __future__ import annotations

from typing import Any

from server.errors import FieldViolation, InvalidRequest
from server.providers.openai_compat import OpenAICompatible, without_opaque_parts

# Accepted by deepseek-reasoner but without effect (its docs).
_REASONER_IGNORES = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


class DeepSeekProvider(OpenAICompatible):
    """OpenAI-compatible; reasoning kept only where thinking mode needs it, no strict tools."""

    name = "deepseek"

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            raise InvalidRequest(
                "llm_config.response_format: deepseek takes json_object only, not json_schema",
                metadata={"provider": self.name, "field": "llm_config.response_format.type"},
                field_violations=[
                    FieldViolation(
                        "llm_config.response_format.type", "deepseek takes json_object, not json_schema"
                    )
                ],
            )
        messages = body["messages"]
        keep = _reasoning_kept(messages)
        tools: list[dict[str, Any]] = body.get("tools") or []
        strict = any("strict" in (t.get("function") or {}) for t in tools)
        ignored = [k for k in _REASONER_IGNORES if k in body] if "reasoner" in str(body.get("model")) else []
        opaque = [i for i, m in enumerate(messages) if _needs_cleaning(m, i in keep)]
        if not opaque and not strict and not ignored:
            return body, []
        out = {k: v for k, v in body.items() if k not in ignored}
        notes = list(ignored)
        if opaque:
            cleaned = set(opaque)
            out["messages"] = [
                without_opaque_parts(m, keep_reasoning=i in keep) if i in cleaned else m
                for i, m in enumerate(messages)
            ]
            if any("reasoning_content" in messages[i] and i not in keep for i in opaque):
                notes.append("messages[].reasoning_content")
            if any(_has_thinking_parts(messages[i]) for i in opaque):
                notes.append("thinking_blocks")
        if strict:
            out["tools"] = [_without_strict(t) for t in tools]
            notes.append("tools[].function.strict")
        return out, notes


def _reasoning_kept(messages: list[dict[str, Any]]) -> set[int]:
    """Indexes of the assistant messages whose reasoning_content DeepSeek must get back: those
    of a user-to-user segment in which the model made a tool call."""
    kept: set[int] = set()
    segment: list[int] = []
    called = False
    for i, message in enumerate([*messages, {"role": "user"}]):  # a sentinel closes the last one
        role = message.get("role")
        if role == "user":
            if called:
                kept.update(j for j in segment if "reasoning_content" in messages[j])
            segment, called = [], False
        elif role == "assistant":
            segment.append(i)
            called = called or bool(message.get("tool_calls"))
    return kept


def _has_thinking_parts(message: dict[str, Any]) -> bool:
    if "thinking_blocks" in message:
        return True
    return any("thought_signature" in call for call in message.get("tool_calls") or ())


def _needs_cleaning(message: dict[str, Any], keep_reasoning: bool) -> bool:
    if _has_thinking_parts(message):
        return True
    return message.get("role") == "assistant" and "reasoning_content" in message and not keep_reasoning


def _without_strict(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict) or "strict" not in function:
        return tool
    return {**tool, "function": {k: v for k, v in function.items() if k != "strict"}}
