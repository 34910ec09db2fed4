"""Groq: the OpenAI Chat Completions dialect at `https://api.groq.com/openai/v1`, Bearer auth.

Groq documents (console.groq.com/docs/openai, "Currently Unsupported OpenAI Features") that
`logprobs`, `logit_bias`, `top_logprobs`, `messages[].name` and an `n` other than 1 are answered
with a 400. The gateway drops them before sending and names each one in the notes (logged), so an
agent's message names or a client's extra parameters do not turn a call into an upstream 400.
Everything else (tools, `tool_choice`, `parallel_tool_calls`, `max_completion_tokens`,
`reasoning_effort` on the models that take it, streams with usage) is sent as built; a model that
refuses `reasoning_effort` answers its own 400, which maps as any 400 does.
"""

from __future__ import annotations

from typing import Any

from server.providers.openai_compat import OpenAICompatible

# Top-level fields Groq answers 400 for.
_REJECTED = ("logprobs", "logit_bias", "top_logprobs")


class GroqProvider(OpenAICompatible):
    """OpenAI-compatible, minus the fields Groq refuses."""

    name = "groq"

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        body, notes = super().build_body(body, stream=stream)
        dropped = [key for key in _REJECTED if key in body]
        if body.get("n", 1) != 1:
            dropped.append("n")
        named = any("name" in m for m in body["messages"])
        if not dropped and not named:
            return body, notes
        out = {k: v for k, v in body.items() if k not in dropped}
        if named:
            out["messages"] = [_without_name(m) for m in body["messages"]]
            dropped.append("messages[].name")
        return out, [*notes, *dropped]


def _without_name(message: dict[str, Any]) -> dict[str, Any]:
    if "name" not in message:
        return message
    return {k: v for k, v in message.items() if k != "name"}
