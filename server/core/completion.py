"""Convert upstream ChatCompletion JSON (and stream chunks) to the contract's protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmgateway.v1 import chat_pb2

from server.core.messages import thinking_block_into
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


_EMPTY: dict[str, Any] = {}

# Bounds on what one answer may hold (issue 12): an upstream's chunk with 100,000 choices became
# 100,000 gRPC messages. The request asks for one choice; 16 leaves room for servers that answer
# a few. An index must be below its count (a client may allocate by index). The completion's
# id, model and system_fingerprint are short in every real answer; the accumulator keeps only the
# latest of each, so they are checked once, in the final completion. Tool-call ids and names are
# relayed in deltas and count against the answer cap instead.
MAX_CHOICES = 16
MAX_TOOL_CALLS = 128  # per choice
MAX_LABEL_CHARS = 1024
MAX_TOKEN_COUNT = 2**31 - 1  # the fields of `Usage` (and of a trace's usage, read back as one) are int32


def text_bytes(text: str) -> int:
    """UTF-8 size of a text (isascii is O(1) in CPython: the common case costs no encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def answer_bytes(body: dict[str, Any]) -> int:
    """The size the answer cap counts: UTF-8 bytes of every choice's content, reasoning, refusal,
    thinking blocks and tool calls (id, name, arguments, thought_signature). What the final
    message adds to it is small and bounded (the completion's id and model are at most
    MAX_LABEL_CHARS; framing per choice and call)."""
    size = 0
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            size += text_bytes(text_of(message.get(key)))
        # Opaque signatures and redacted thinking can be large (the stream counts them too); only
        # string fields are kept (thinking_block_into), so only they are counted.
        for block in message.get("thinking_blocks") or ():
            if isinstance(block, dict):
                size += sum(text_bytes(v) for v in block.values() if isinstance(v, str))
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                size += text_bytes(function.get("name") or "") + text_bytes(function.get("arguments") or "")
            if isinstance(call, dict):
                size += text_bytes(call.get("id") or "")
                signature = call.get("thought_signature")
                if isinstance(signature, str):
                    size += text_bytes(signature)
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            size += text_bytes(legacy.get("name") or "") + text_bytes(legacy.get("arguments") or "")
    return size


def answer_too_large(provider: str, limit: int, size: int) -> UpstreamBadResponse:
    # UPSTREAM_BAD_RESPONSE like a unary body over 64 MiB: the upstream answered more than the
    # gateway carries. Not RESOURCE_EXHAUSTED: the contract keeps that for rate limits and quotas,
    # where waiting helps; here it does not.
    return UpstreamBadResponse(
        f"{provider} answered more than {limit} bytes of text (LLMGW_MAX_ANSWER_BYTES)",
        metadata={"provider": provider, "limit_bytes": limit, "answer_bytes": size},
    )


def check_answer_size(size: int, limit: int, *, provider: str) -> None:
    if size > limit:
        raise answer_too_large(provider, limit, size)


def too_many(provider: str, where: str, count: int, limit: int) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"{provider} answered {count} at {where}, over the limit of {limit}",
        metadata={"provider": provider, "field": where, "count": count, "limit": limit},
    )


def text_of(value: object) -> str:
    """Text of a content value: a string, or content parts (some servers send `[{"text": ...}]`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text") or "" for p in value if isinstance(p, dict))
    return ""


def finish_reason(value: object) -> chat_pb2.FinishReason:
    if not value:
        return chat_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS.get(str(value), chat_pb2.FINISH_REASON_UNSPECIFIED)


def usage_from_json(usage: dict[str, Any] | None, into: chat_pb2.Usage | None = None) -> chat_pb2.Usage:
    """The typed usage; `into`, when given, must be empty (a field of a message just made):
    a count of 0 is not written, as it would change nothing there (each write of a field is a
    look-up of its name)."""
    out = into if into is not None else chat_pb2.Usage()
    if not usage:
        return out
    get = usage.get
    prompt_details = get("prompt_tokens_details") or _EMPTY
    completion_details = get("completion_tokens_details") or _EMPTY
    # The counts are ints already (shape-checked) but for a translator's own: int() only then
    # (inline, not a helper: a call per count is most of what this saves).
    prompt = n if type(n := get("prompt_tokens") or 0) is int else int(n)
    completion = n if type(n := get("completion_tokens") or 0) is int else int(n)
    total = n if type(n := get("total_tokens") or prompt + completion) is int else int(n)
    cached = (
        n
        if type(n := prompt_details.get("cached_tokens") or get("prompt_cache_hit_tokens") or 0) is int
        else int(n)
    )
    reasoning = n if type(n := completion_details.get("reasoning_tokens") or 0) is int else int(n)
    cache_write = n if type(n := get("cache_write_tokens") or 0) is int else int(n)
    if prompt:
        out.prompt_tokens = prompt
    if completion:
        out.completion_tokens = completion
    if total:
        out.total_tokens = total
    if cached:
        out.cached_tokens = cached
    if reasoning:
        out.reasoning_tokens = reasoning
    if cache_write:
        out.cache_write_tokens = cache_write
    # Anthropic's split of the writes (set by its translator); bounded by the writes it splits.
    one_hour = get("cache_write_1h_tokens")
    if isinstance(one_hour, int) and 0 < one_hour <= cache_write:
        out.cache_write_1h_tokens = one_hour
    return out


def _signature(value: object) -> str:
    # Only Gemini's translator sets it; an OpenAI-compatible upstream's own value may be anything.
    return value if isinstance(value, str) else ""


def _fill_message(out: chat_pb2.Message, message: dict[str, Any]) -> None:
    """`message` into the empty `out` (as `usage_from_json`: empty values are not written)."""
    out.role = chat_pb2.ROLE_ASSISTANT
    get = message.get
    tool_calls = get("tool_calls")
    if tool_calls:
        calls = out.tool_calls
        for call in tool_calls:
            function = call.get("function") or _EMPTY
            calls.add(
                id=call.get("id") or "",
                name=function.get("name") or "",
                arguments=function.get("arguments") or "",
                thought_signature=_signature(call.get("thought_signature")),
            )
    legacy = get("function_call")
    if legacy and not out.tool_calls:
        out.tool_calls.add(name=legacy.get("name") or "", arguments=legacy.get("arguments") or "")
    content = get("content")
    if type(content) is not str:  # content parts (the usual content is a string)
        content = text_of(content)
    if content:
        out.content = content
    reasoning = get("reasoning_content") or get("reasoning")
    if reasoning:
        out.reasoning_content = reasoning
    refusal = get("refusal")
    if refusal:
        out.refusal = refusal
    blocks = get("thinking_blocks")
    if blocks:
        for block in blocks:
            if isinstance(block, dict):
                thinking_block_into(out.thinking_blocks.add(), block)


def completion_from_json(
    body: dict[str, Any], *, provider: str, into: chat_pb2.ChatCompletion | None = None
) -> chat_pb2.ChatCompletion:
    """The typed completion; an answer without choices is a bad response, not an empty answer.

    Filled in place into `into` when given, which must be empty (the completion field of the
    response about to be sent: building it there saves copying the whole message into the
    response). Every check is made before anything is written.
    """
    get = body.get
    choices_json = get("choices")
    if not isinstance(choices_json, list) or not choices_json:
        raise UpstreamBadResponse(f"{provider} answered without choices", metadata={"provider": provider})
    if len(choices_json) > MAX_CHOICES:
        raise too_many(provider, "choices", len(choices_json), MAX_CHOICES)
    for position, choice in enumerate(choices_json):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise UpstreamBadResponse(
                f"{provider} answered a choice without a message",
                metadata={"provider": provider, "choice": position},
            )
    answer_id, model, fingerprint = get("id"), get("model"), get("system_fingerprint")
    # A label of another type is written as its str(), so it is bounded as that string (a list
    # of numbers there was an id of megabytes, past MAX_LABEL_CHARS and the answer cap).
    if answer_id and type(answer_id) is not str:
        answer_id = str(answer_id)
    if model and type(model) is not str:
        model = str(model)
    if fingerprint and type(fingerprint) is not str:
        fingerprint = str(fingerprint)
    if (  # tested inline: the loop naming the first one over runs only when one is
        (isinstance(answer_id, str) and len(answer_id) > MAX_LABEL_CHARS)
        or (isinstance(model, str) and len(model) > MAX_LABEL_CHARS)
        or (isinstance(fingerprint, str) and len(fingerprint) > MAX_LABEL_CHARS)
    ):
        for key, label in (("id", answer_id), ("model", model), ("system_fingerprint", fingerprint)):
            if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
                raise UpstreamBadResponse(
                    f"{provider} answered a {key} over {MAX_LABEL_CHARS} characters",
                    metadata={"provider": provider, "field": key, "limit": MAX_LABEL_CHARS},
                )
    out = into if into is not None else chat_pb2.ChatCompletion()
    # Empty values are not written (`out` is empty): a write is a look-up of the field's name.
    if answer_id:
        out.id = answer_id
    if model:
        out.model = model
    created = get("created")
    if created:
        out.created = int(created)
    if fingerprint:
        out.system_fingerprint = fingerprint
    choices = out.choices
    for position, choice in enumerate(choices_json):
        added = choices.add()
        index = int(choice.get("index") or position)
        if index:
            added.index = index
        _fill_message(added.message, choice["message"])
        reason = finish_reason(choice.get("finish_reason"))
        if reason:
            added.finish_reason = reason
    usage = out.usage
    usage.SetInParent()  # always present, as an answer without usage reports zeros
    usage_from_json(get("usage"), usage)
    return out


# What the deltas of one choice carried: content, reasoning, each tool call's arguments.
StreamedText = tuple[str, str, tuple[str, ...]]


def streamed_texts(body: dict[str, Any]) -> list[StreamedText]:
    """Per choice, the text the deltas carried: take it from the assembled answer before the
    gateway changes it (inner thoughts unpacked)."""
    texts: list[StreamedText] = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or _EMPTY
        arguments = tuple(
            (call.get("function") or _EMPTY).get("arguments") or ""
            for call in message.get("tool_calls") or ()
        )
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        texts.append((text_of(message.get("content")), str(reasoning), arguments))
    return texts


def leave_out_streamed(completion: chat_pb2.ChatCompletion, streamed: list[StreamedText]) -> None:
    """Empty every text of the final completion that equals what the deltas carried.

    `final_completion_without_deltas`: an answer over 4 MiB (a default client's receive limit)
    then still reaches a default client whole, assembled from the deltas. A text the gateway
    changed is kept, so an empty field always means "what the deltas carried".
    """
    for choice, (content, reasoning, arguments) in zip(completion.choices, streamed, strict=False):
        message = choice.message
        if message.content == content:
            message.ClearField("content")
        if message.reasoning_content == reasoning:
            message.ClearField("reasoning_content")
        for call, raw in zip(message.tool_calls, arguments, strict=False):
            if call.arguments == raw:
                call.ClearField("arguments")


# What a delta carries, in the order a client reads one message: reasoning, content, tool calls.
_REASONING, _CONTENT, _TOOLS = 1, 2, 3


class _PendingDelta:
    """One delta event being assembled from consecutive chunks of the same choice."""

    __slots__ = ("index", "kind", "reasoning", "content", "fragments", "finish")

    def __init__(self, index: int) -> None:
        self.index = index
        self.kind = 0  # the last kind it carries (0: none yet)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.fragments: list[tuple[int, str, str, list[str]]] = []  # index, id, name, arguments
        self.finish: chat_pb2.FinishReason = chat_pb2.FINISH_REASON_UNSPECIFIED

    def event(self) -> chat_pb2.StreamCreateResponse:
        event = chat_pb2.StreamCreateResponse()
        delta = event.delta
        delta.SetInParent()
        if self.index:
            delta.index = self.index
        if self.reasoning:
            delta.reasoning_content = "".join(self.reasoning)
        if self.content:
            delta.content = "".join(self.content)
        for call_index, call_id, name, arguments in self.fragments:
            fragment = delta.tool_calls.add()
            if call_index:
                fragment.index = call_index
            if call_id:
                fragment.id = call_id
            if name:
                fragment.name = name
            if arguments:
                fragment.arguments = "".join(arguments)
        if self.finish:
            delta.finish_reason = self.finish
        return event


def deltas_from_chunks(chunks: Iterable[dict[str, Any] | None]) -> list[chat_pb2.StreamCreateResponse]:
    """The delta events of chunks that arrived together (up to a None, `[DONE]`), in order.

    One event per choice per chunk that carries something, except that consecutive pieces of the
    same choice and the same kind are sent as one event: content after content, reasoning after
    reasoning, argument fragments of the same tool call (one without an id or a name of its own)
    after it, and a finish reason after any of them. Nothing is merged across a change of choice,
    of kind or of tool call, nor after a finish reason, so concatenating what the events carry,
    in order, gives exactly what the chunks carried.
    """
    if type(chunks) is list and len(chunks) == 1:
        plain = plain_choice(chunks[0])
        if plain is not None:
            return [plain_event(*plain)]
    events: list[chat_pb2.StreamCreateResponse] = []
    pending: _PendingDelta | None = None
    for chunk in chunks:
        if chunk is None:
            break
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = text_of(delta.get("reasoning_content") or delta.get("reasoning"))
            content = text_of(delta.get("content"))
            calls = delta.get("tool_calls")
            legacy = delta.get("function_call")
            reason = finish_reason(choice.get("finish_reason"))
            if reasoning:
                first = last = _REASONING
                if content:
                    last = _CONTENT
            elif content:
                first = last = _CONTENT
            else:
                first = last = 0
            if calls or legacy:
                last = _TOOLS
                first = first or _TOOLS
            if not (last or reason):
                continue
            index = int(choice.get("index") or 0)
            if (
                pending is None
                or pending.index != index
                or pending.finish
                or (first and (first != last or first != pending.kind))
            ):
                if pending is not None:
                    events.append(pending.event())
                pending = _PendingDelta(index)
            if last:
                pending.kind = last
            if reasoning:
                pending.reasoning.append(reasoning)
            if content:
                pending.content.append(content)
            fragments = pending.fragments
            for fragment in calls or ():
                function = fragment.get("function") or {}
                _add_fragment(
                    fragments,
                    int(fragment.get("index") or 0),
                    fragment.get("id") or "",
                    function.get("name") or "",
                    function.get("arguments") or "",
                )
            if legacy:
                _add_fragment(fragments, 0, "", legacy.get("name") or "", legacy.get("arguments") or "")
            if reason:
                pending.finish = reason
    if pending is not None:
        events.append(pending.event())
    return events


def plain_choice(chunk: dict[str, Any] | None) -> tuple[dict[str, Any], str] | None:
    """The one choice of a chunk whose delta relays text content and nothing else (no
    reasoning, no calls; a finish reason may come with it), and that content; None for any
    other chunk (the general code then does it, with the same result).

    Almost every read of a stream is one such chunk: its event is built by `plain_event`,
    without a `_PendingDelta` and the general loop's tests.
    """
    if chunk is None:
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    content = delta.get("content")
    if type(content) is not str or not content:
        return None
    if len(delta) != 1:  # content alone needs no more look-ups
        get = delta.get
        if get("reasoning_content") or get("reasoning") or get("tool_calls") or get("function_call"):
            return None
    return choice, content


def plain_event(choice: dict[str, Any], content: str) -> chat_pb2.StreamCreateResponse:
    """The delta event of a `plain_choice` (what `deltas_from_chunks` makes of its chunk)."""
    event = chat_pb2.StreamCreateResponse()
    delta = event.delta
    delta.content = content
    index = choice.get("index")
    if index:
        delta.index = int(index)
    reason = choice.get("finish_reason")
    if reason:
        delta.finish_reason = finish_reason(reason)
    return event


def _add_fragment(
    fragments: list[tuple[int, str, str, list[str]]], index: int, call_id: str, name: str, arguments: str
) -> None:
    """Append a tool-call fragment, onto the previous one when it only continues its arguments."""
    if fragments and not call_id and not name and fragments[-1][0] == index:
        fragments[-1][3].append(arguments)
    else:
        fragments.append((index, call_id, name, [arguments]))
