"""Convert upstream ChatCompletion JSON (and stream chunks) to the contract's protobuf messages."""

from __future__ import annotations

from typing import Any

from llmgateway.v1 import chat_pb2

from server.errors import UpstreamBadResponse

_FINISH_REASONS: dict[str, chat_pb2.FinishReason] = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": chat_pb2.FINISH_REASON_CONTENT_FILTER,
    "function_call": chat_pb2.FINISH_REASON_FUNCTION_CALL,
    # Some OpenAI-compatible servers say these.
    "eos": chat_pb2.FINISH_REASON_STOP,
    "stop_sequence": chat_pb2.FINISH_REASON_STOP,
    "end_turn": chat_pb2.FINISH_REASON_STOP,
    "max_tokens": chat_pb2.FINISH_REASON_LENGTH,
    "tool_use": chat_pb2.FINISH_REASON_TOOL_CALLS,
}


def finish_reason(value: object) -> chat_pb2.FinishReason:
    if not value:
        return chat_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS.get(str(value), chat_pb2.FINISH_REASON_UNSPECIFIED)


def usage_from_json(usage: dict[str, Any] | None) -> chat_pb2.Usage:
    if not usage:
        return chat_pb2.Usage()
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return chat_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
        cached_tokens=int(prompt_details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _message_from_json(message: dict[str, Any]) -> chat_pb2.Message:
    tool_calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        tool_calls.append(
            chat_pb2.ToolCall(
                id=call.get("id") or "",
                name=function.get("name") or "",
                arguments=function.get("arguments") or "",
            )
        )
    legacy = message.get("function_call")
    if legacy and not tool_calls:
        tool_calls.append(
            chat_pb2.ToolCall(name=legacy.get("name") or "", arguments=legacy.get("arguments") or "")
        )
    content = message.get("content")
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return chat_pb2.Message(
        role=chat_pb2.ROLE_ASSISTANT,
        content=content or "",
        tool_calls=tool_calls,
        reasoning_content=message.get("reasoning_content") or message.get("reasoning") or "",
    )


def completion_from_json(body: dict[str, Any], *, provider: str) -> chat_pb2.ChatCompletion:
    """The typed completion; an answer without choices is a bad response, not an empty answer."""
    choices_json = body.get("choices")
    if not isinstance(choices_json, list) or not choices_json:
        raise UpstreamBadResponse(f"{provider} answered without choices", metadata={"provider": provider})
    choices = []
    for position, choice in enumerate(choices_json):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise UpstreamBadResponse(
                f"{provider} answered a choice without a message",
                metadata={"provider": provider, "choice": position},
            )
        choices.append(
            chat_pb2.Choice(
                index=int(choice.get("index") or position),
                message=_message_from_json(choice["message"]),
                finish_reason=finish_reason(choice.get("finish_reason")),
            )
        )
    return chat_pb2.ChatCompletion(
        id=str(body.get("id") or ""),
        model=str(body.get("model") or ""),
        created=int(body.get("created") or 0),
        choices=choices,
        usage=usage_from_json(body.get("usage")),
        system_fingerprint=str(body.get("system_fingerprint") or ""),
    )


def deltas_from_chunk(chunk: dict[str, Any]) -> list[chat_pb2.StreamCreateResponse]:
    """One delta event per choice in the chunk that carries something."""
    events = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        fragments = []
        for fragment in delta.get("tool_calls") or ():
            function = fragment.get("function") or {}
            fragments.append(
                chat_pb2.ToolCallDelta(
                    index=int(fragment.get("index") or 0),
                    id=fragment.get("id") or "",
                    name=function.get("name") or "",
                    arguments=function.get("arguments") or "",
                )
            )
        legacy = delta.get("function_call")
        if legacy:
            fragments.append(
                chat_pb2.ToolCallDelta(name=legacy.get("name") or "", arguments=legacy.get("arguments") or "")
            )
        content = delta.get("content") or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        reason = finish_reason(choice.get("finish_reason"))
        if not (content or reasoning or fragments or reason):
            continue
        events.append(
            chat_pb2.StreamCreateResponse(
                delta=chat_pb2.ChatCompletionDelta(
                    index=int(choice.get("index") or 0),
                    content=content,
                    reasoning_content=reasoning,
                    tool_calls=fragments,
                    finish_reason=reason,
                )
            )
        )
    return events
