"""DeepSeek: the OpenAI Chat Completions dialect at `https://api.deepseek.com/v1`, Bearer auth.

Quirks handled here:
- `reasoning_content` (and OpenRouter-style `reasoning`) on an assistant message of the history
  is not sent back: DeepSeek's reasoner documents a 400 for input messages that carry it. The
  contract already treats `Message.reasoning_content` as answers-only, so this is a second line
  of defence for histories built elsewhere. Answers and streams are not touched: their
  `reasoning_content` maps to the completion's reasoning as for any OpenAI-compatible server.
- `strict` on tool functions is dropped: DeepSeek takes strict tool schemas only on its beta base
  URL (`https://api.deepseek.com/beta`). The (strict-converted) schema itself is still sent.
- Usage: `prompt_cache_hit_tokens` becomes `cached_tokens` (server.core.completion reads it when
  `prompt_tokens_details` is absent); `prompt_tokens` already includes hits and misses, so
  `prompt_cache_miss_tokens` needs no mapping.
"""

from __future__ import annotations

from typing import Any

from server.providers.openai_compat import OpenAICompatible

_REASONING_FIELDS = ("reasoning_content", "reasoning")


class DeepSeekProvider(OpenAICompatible):
    """OpenAI-compatible, without reasoning in the history and without strict tools."""

    name = "deepseek"

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        body, notes = super().build_body(body, stream=stream)
        messages = body["messages"]
        reasoning = any(m.get("role") == "assistant" and _has_reasoning(m) for m in messages)
        tools: list[dict[str, Any]] = body.get("tools") or []
        strict = any("strict" in (t.get("function") or {}) for t in tools)
        if not reasoning and not strict:
            return body, notes
        out = dict(body)
        if reasoning:
            out["messages"] = [_without_reasoning(m) for m in messages]
            notes = [*notes, "messages[].reasoning_content"]
        if strict:
            out["tools"] = [_without_strict(t) for t in tools]
            notes = [*notes, "tools[].function.strict"]
        return out, notes


def _has_reasoning(message: dict[str, Any]) -> bool:
    return any(key in message for key in _REASONING_FIELDS)


def _without_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") != "assistant" or not _has_reasoning(message):
        return message
    return {k: v for k, v in message.items() if k not in _REASONING_FIELDS}


def _without_strict(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict) or "strict" not in function:
        return tool
    return {**tool, "function": {k: v for k, v in function.items() if k != "strict"}}
