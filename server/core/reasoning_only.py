"""An answer that is only reasoning, on the OpenAI-compatible and Anthropic paths.

A choice that says it is complete (`finish_reason: "stop"`, or "eos", "end_turn",
"stop_sequence", which the caller also gets as FINISH_REASON_STOP) but carries nothing besides
reasoning (`reasoning_content`, DeepSeek-reasoner and Anthropic's thinking; `reasoning`, vLLM
and OpenRouter): no content (or only blanks), no tool call, no legacy function_call, no refusal.
An agent would take the empty content for a final answer, so it is UPSTREAM_BAD_RESPONSE with
metadata `cause` = REASONING_ONLY and `reasoning_chars`, as Gemini's answer of only thoughts
(`server.providers.gemini`) is. The reasoning stays in the trace (response_json is set before
the check), and so do the upstream's token counts: they were spent.

Not this error: an answer cut at the token limit (`finish_reason: "length"`, OK/LENGTH: the
answer may be what was cut), and a required call answered without one (TOOL_CALL_MISSING,
checked first by `server.core.tool_call_check.enforce`).
"""

from __future__ import annotations

from typing import Any

from llmgateway.v1 import chat_pb2

from server.core.completion import finish_reason, text_of
from server.core.tool_call_check import keep_usage
from server.errors import UpstreamBadResponse
from server.traces.base import TraceRecord

REASONING_ONLY = "reasoning_only"  # the `cause` of the error (Gemini's thoughts-only answer too)


def reasoning_only(choice: object) -> str | None:
    """The reasoning of a completed choice that has nothing else; None for any other choice."""
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    # The reasoning first: the usual answer has none, and nothing else is looked at then.
    get = message.get
    reasoning = get("reasoning_content")
    if not (isinstance(reasoning, str) and reasoning.strip()):
        reasoning = get("reasoning")
        if not (isinstance(reasoning, str) and reasoning.strip()):
            return None
    # "stop" and the spellings the caller also gets as FINISH_REASON_STOP ("eos", "end_turn",
    # "stop_sequence" of some OpenAI-compatible servers): complete, as far as the caller can tell.
    if finish_reason(choice.get("finish_reason")) != chat_pb2.FINISH_REASON_STOP:
        return None
    if text_of(get("content")).strip() or get("tool_calls") or get("function_call"):
        return None
    refusal = get("refusal")
    if isinstance(refusal, str) and refusal.strip():
        return None
    return reasoning


def check(answer: dict[str, Any], *, provider: str) -> None:
    """Raise UPSTREAM_BAD_RESPONSE when a choice of the OpenAI-shaped answer is only reasoning."""
    choices = answer.get("choices")
    for index, choice in enumerate(choices if isinstance(choices, list) else ()):
        reasoning = reasoning_only(choice)
        if reasoning is not None:
            finish = str(choice["finish_reason"])  # one of the few that mean stop: short
            raise UpstreamBadResponse(
                f"{provider} answered only reasoning ({len(reasoning)} characters) and no content, "
                f"tool call or refusal, with finish_reason {finish}",
                metadata={
                    "provider": provider,
                    "cause": REASONING_ONLY,
                    "reasoning_chars": len(reasoning),
                    "finish_reason": finish,
                    "choice": index,
                },
            )


def enforce(answer: dict[str, Any], record: TraceRecord, *, provider: str) -> None:
    """`check`, keeping the upstream's token counts on the trace when it fails."""
    try:
        check(answer, provider=provider)
    except UpstreamBadResponse:
        keep_usage(record, answer.get("usage"))
        raise
