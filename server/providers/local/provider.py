"""Calls to local LLM servers: render the prompt, call the server, parse the function call.

Uses the pure pieces of this package (see its docstring for the order) and the gateway's shared
machinery: endpoint policy, token guard, retries, deadline, tracing. The gateway hands itself in
as a `CallHost` (the protocol below), so this module never imports `server.gateway`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import orjson
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.config import Settings
from server.core import offload, tokens, tool_call_check, tools
from server.core.answer_scrub import AnswerScrubber
from server.core.completion import (
    MAX_TOKEN_COUNT,
    answer_too_large,
    check_answer_size,
    completion_from_json,
    leave_out_streamed,
    text_bytes,
)
from server.core.keys import ByokUrls, EndpointChecker, check_endpoint, private_ok
from server.core.messages import functions_to_dicts, to_openai_messages
from server.core.retry import Deadline
from server.core.stream import TextParts
from server.errors import (
    FieldViolation,
    GatewayError,
    InvalidRequest,
    UnparseableModelOutput,
    UpstreamBadResponse,
)
from server.providers import openai_compat
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient, Response
from server.providers.local import exact_count
from server.providers.local.completion import cut_completion, to_chat_completion
from server.providers.local.deepseek import is_deepseek_r1, with_functions_in_system_prompt
from server.providers.local.endpoints import (
    accepts_grammar,
    auth_headers,
    build_local_request,
    extract_completion,
    local_sampling,
    parse_stream_event,
    stream_framing,
)
from server.providers.local.grammar import build_grammar
from server.providers.local.parsing import parse_function_call
from server.providers.local.wrappers import (
    first_message_prefix,
    render_prompt,
    stop_strings,
    wrapper_uses_grammar,
)
from server.providers.openai_compat import (
    LineReader,
    broken_stream,
    event_too_large,
    open_stream,
    parse_json_object,
    post_json,
    released_when_done,
    sse_batches,
)
from server.traces.base import TraceRecord

ChatRequest = chat_pb2.CreateRequest  # StreamCreateRequest/CountTokensRequest are wire-identical


class HostDependencies(Protocol):
    """The gateway's dependencies this module uses (`server.gateway.Dependencies`)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def http(self) -> HttpClient: ...
    @property
    def policy(self) -> EndpointChecker: ...
    @property
    def byok_urls(self) -> ByokUrls: ...
    @property
    def scrub(self) -> Callable[[str], str]: ...


class HostCall(Protocol):
    """One traced call in progress (`server.gateway.TracedCall`)."""

    record: TraceRecord
    span: Any
    completion: chat_pb2.ChatCompletion | None
    partial: Callable[[], str] | None

    def first_token(self) -> None: ...


class CallHost(Protocol):
    """What the local path needs of the orchestrator (`server.gateway.Gateway` is one)."""

    @property
    def deps(self) -> HostDependencies: ...

    async def guard(
        self,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        *,
        off: bool = False,
    ) -> tokens.TokenCount | None: ...

    def traced_call(
        self, request: ChatRequest, actor: Actor, target: UpstreamTarget, payload: bytes, kind: str
    ) -> AbstractContextManager[HostCall]: ...

    def call_options(self, deadline: Deadline, span: Any) -> openai_compat.CallOptions: ...

    def answer_scrubber(self, target: UpstreamTarget) -> AnswerScrubber: ...


# Outputs longer than this are parsed in the offload pool: the lenient reader is pure Python
# (~1-2 us per character read, a few reads per output), and a normal answer (a few hundred
# characters) must not pay a thread hop. It holds the GIL, but a thread gives the GIL back to
# the loop every switch interval (5 ms): measured, a 5 MB output parsed in the pool left the
# loop's worst lag at ~40 ms, against 0.4 s inline.
PARSE_INLINE_CHARS = 4096


def prompt_parts(request: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The OpenAI-format messages (DeepSeek-R1 prompting applied, on a copy) and function dicts."""
    config = request.llm_config
    messages = to_openai_messages(request.messages, model=config.model)
    functions = functions_to_dicts(request.functions)
    forced = forced_function(request)
    if forced:  # the prompt (and the grammar) offer the forced function alone
        functions = [fn for fn in functions if fn["name"] == forced]
    if is_deepseek_r1(config.model):
        messages = with_functions_in_system_prompt(messages, functions)
    return messages, functions


def forced_function(request: ChatRequest) -> str:
    """The function the caller forced (`force_tool_call`, or `function_call` naming one), or "";
    InvalidRequest for a name that is not among the functions, as on the OpenAI-compatible path."""
    config = request.llm_config
    choice = tools.resolve_tool_choice(
        function_call=request.function_call,
        force_tool_call=request.force_tool_call,
        function_names=[fn.name for fn in request.functions],
        handle=config.handle,
        endpoint=config.model_endpoint,
        model=config.model,
    )
    return str(choice["function"]["name"]) if isinstance(choice, dict) else ""


def keep_counts(record: TraceRecord, prompt_tokens: int | None, completion_tokens: int | None) -> None:
    """The server's token counts on the trace of an answer that failed (unparseable, no call):
    the tokens were spent and are billed whatever the gateway made of them."""
    if (prompt_tokens or 0) + (completion_tokens or 0) > MAX_TOKEN_COUNT:
        return  # a trace's usage no Usage can hold would fail every read of it (see below)
    record.prompt_tokens = prompt_tokens or 0
    record.completion_tokens = completion_tokens or 0
    record.total_tokens = record.prompt_tokens + record.completion_tokens


async def _plan(
    gateway: CallHost,
    request: ChatRequest,
    target: UpstreamTarget,
    deadline: Deadline,
    *,
    stream: bool,
    organization: str,
    off: bool = False,
) -> _LocalCall:
    """Check, count (the guard; off the loop when large) and render one local call.

    `off`: a huge function set (`validation.off_loop`): converted, counted and rendered (prompt
    and grammar) in the offload pool; a normal request does all of it here."""
    config = request.llm_config
    wrapper = config.model_wrapper
    if wrapper_uses_grammar(wrapper) and not accepts_grammar(config.model_endpoint_type):
        # Refused whether or not there are functions: the caller asked for a grammar.
        description = (
            f"{config.model_endpoint_type} does not accept a grammar; use a wrapper without "
            "'-grammar', or a llamacpp, koboldcpp or webui endpoint"
        )
        raise InvalidRequest(
            description, field_violations=[FieldViolation("llm_config.model_wrapper", description)]
        )
    messages, functions = await offload.run_if(off, lambda: prompt_parts(request))
    exact = gateway.deps.settings.local_exact_tokens and config.model_endpoint_type in exact_count.SUPPORTED
    count = None if exact else await gateway.guard(request, messages, functions, off=off)
    if count is None:  # no context window (or the server counts): still count, for usage
        count = await tokens.count_request_tokens_async(messages, functions, config.model, off=off)
    counted = count
    plan = await offload.run_if(
        off, lambda: _LocalCall(request, target, messages, functions, counted, stream=stream)
    )
    if exact:
        options = gateway.call_options(deadline, None)
        served = await exact_count.count_prompt(
            gateway.deps.http,
            target,
            plan.endpoint_type,
            config.model,
            plan.prompt,
            options,
            organization=organization,
        )
        if served is None:  # the server could not count: the tiktoken guard decides
            await gateway.guard(request, messages, functions, off=off)
        else:
            exact_count.check_window(served, config.context_window, provider=target.provider)
            plan.count = tokens.TokenCount(served, 0, exact_count.ENCODING)
    return plan


class _LocalCall:
    """Everything planned for one local call, before anything is sent."""

    def __init__(
        self,
        request: ChatRequest,
        target: UpstreamTarget,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        count: tokens.TokenCount,
        *,
        stream: bool,
    ) -> None:
        config = request.llm_config
        self.request = request
        self.endpoint_type = config.model_endpoint_type
        wrapper = config.model_wrapper
        self.messages, self.functions, self.count = messages, functions, count
        self.want = tool_call_check.expected(request)
        first_thoughts = not request.HasField("put_inner_thoughts_first") or request.put_inner_thoughts_first
        self.prompt = render_prompt(
            wrapper,
            self.messages,
            self.functions,
            first_message=request.first_message,
            put_inner_thoughts_in_kwargs=config.put_inner_thoughts_in_kwargs,
            put_inner_thoughts_first=first_thoughts,
        )
        # render_prompt already ends the prompt with this prefix; the parser puts it back.
        self.prefix = first_message_prefix(self.functions, first_message=request.first_message)
        grammar = None
        if wrapper_uses_grammar(wrapper) and self.functions:
            grammar = build_grammar(
                self.functions,
                put_inner_thoughts_in_kwargs=config.put_inner_thoughts_in_kwargs,
                put_inner_thoughts_first=first_thoughts,
                first_message=request.first_message,
            )
        self.http_request = build_local_request(
            self.endpoint_type,
            base_url=target.base_url,
            model=config.model,
            prompt=self.prompt,
            context_window=config.context_window,
            max_tokens=config.max_tokens if config.HasField("max_tokens") else None,
            grammar=grammar,
            user=request.user_id,
            stop=[*stop_strings(wrapper), *config.stop],
            stream=stream,
            temperature=config.temperature if config.HasField("temperature") else None,
            sampling=local_sampling(config),
        )

    async def completion_json(
        self, text: str, prompt_tokens: int | None, completion_tokens: int | None, truncated: bool = False
    ) -> dict[str, Any]:
        """The OpenAI ChatCompletion JSON for the model's text (a parsed call, or plain text).

        `truncated` (the server stopped at the token limit): finish_reason "length", and a call
        that was cut before it was complete is returned as the text the model wrote, not as
        UNPARSEABLE_MODEL_OUTPUT (a retry would pay again for the same cut).
        """
        model = self.request.llm_config.model
        if not prompt_tokens:
            prompt_tokens = self.count.total_tokens
        if completion_tokens is None:  # the server reported none (koboldcpp never does)
            completion_tokens = await tokens.count_texts_async([text], model)
        if (prompt_tokens or 0) + completion_tokens > MAX_TOKEN_COUNT:
            # The server's counters are unbounded: counts (or their total) no int32 field of
            # Usage holds are a broken answer, not protobuf's ValueError.
            raise UpstreamBadResponse(
                f"{self.endpoint_type} answered token counts over {MAX_TOKEN_COUNT}",
                metadata={"provider": self.endpoint_type, "field": "usage", "limit": MAX_TOKEN_COUNT},
            )
        if not self.functions:
            # Nothing to call: the text is the answer.
            return {
                "id": f"chatcmpl-local-{uuid.uuid4()}",  # unique under concurrency, as with calls
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text.strip()},
                        "finish_reason": "length" if truncated else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens or 0,
                    "completion_tokens": completion_tokens,
                    "total_tokens": (prompt_tokens or 0) + completion_tokens,
                },
            }
        try:
            if len(text) <= PARSE_INLINE_CHARS:
                parsed = parse_function_call(text, primed_prefix=self.prefix, truncated=truncated)
            else:
                prefix = self.prefix
                parsed = await offload.run(
                    lambda: parse_function_call(text, primed_prefix=prefix, truncated=truncated)
                )
        except UnparseableModelOutput:
            if not truncated:
                raise
            return cut_completion(
                text, model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            )
        return to_chat_completion(
            parsed,
            model=model,
            inner_thoughts=parsed.inner_thoughts,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )


async def _target(gateway: CallHost, request: ChatRequest, actor: Actor) -> UpstreamTarget:
    """The endpoint must be allowed; the local key goes only to its own configured base URL."""
    deps = gateway.deps
    settings = deps.settings
    config = request.llm_config
    endpoint = await check_endpoint(
        config.model_endpoint, actor=actor, policy=deps.policy, byok_urls=deps.byok_urls
    )
    headers: dict[str, str] = {}
    secrets: tuple[str, ...] = ()
    # Operator-listed (LLMGW_ALLOWED_ENDPOINTS): else the endpoint was allowed only as a tenant's
    # BYOK URL, and the operator's local key is not lent to it, even on the local server's host.
    listed = private_ok(endpoint, policy=deps.policy, settings=settings)
    if (
        settings.local_auth_type
        and settings.local_base_url
        and listed
        and deps.policy.key_allowed_for(endpoint, settings.local_base_url)
    ):
        headers = auth_headers(settings.local_auth_type, settings.local_api_key)
        secrets = (settings.local_api_key,)
    return UpstreamTarget(
        endpoint.rstrip("/"),
        headers,
        config.model_endpoint_type,
        secrets=secrets,
        private_ok=listed,
    )


async def create_local(
    gateway: CallHost, request: ChatRequest, actor: Actor, deadline: Deadline, *, off: bool = False
) -> chat_pb2.CreateResponse:
    target = await _target(gateway, request, actor)
    plan = await _plan(
        gateway, request, target, deadline, stream=False, organization=actor.organization_id, off=off
    )
    payload = orjson.dumps(plan.http_request.body)
    with gateway.traced_call(request, actor, target, payload, "create") as call:
        raw, answer = await post_json(
            gateway.deps.http,
            target,
            plan.http_request.url,
            payload,
            gateway.call_options(deadline, call.span),
        )
        call.record.response_json = raw.decode("utf-8", "replace")
        local = extract_completion(plan.endpoint_type, answer)
        limit = gateway.deps.settings.max_answer_bytes
        check_answer_size(text_bytes(local.text), limit, provider=target.provider)
        try:
            answer = await plan.completion_json(
                local.text, local.prompt_tokens, local.completion_tokens, local.truncated
            )
            tool_call_check.enforce(answer, plan.want, call.record, provider=target.provider)
        except GatewayError:
            keep_counts(call.record, local.prompt_tokens, local.completion_tokens)
            raise
        call.completion = completion_from_json(answer, provider=target.provider)
        gateway.answer_scrubber(target).completion(call.completion)  # a server may echo the key
    return chat_pb2.CreateResponse(completion=call.completion, provider_trace_id=call.record.id)


async def stream_local(
    gateway: CallHost, request: ChatRequest, actor: Actor, deadline: Deadline, *, off: bool = False
) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
    """Text deltas as the server produces them, then the completion with the parsed call."""
    target = await _target(gateway, request, actor)
    plan = await _plan(
        gateway, request, target, deadline, stream=True, organization=actor.organization_id, off=off
    )
    payload = orjson.dumps(plan.http_request.body)
    scrub = gateway.deps.scrub
    scrubber = gateway.answer_scrubber(target)  # a server may echo the key, even split over pieces
    limit = gateway.deps.settings.max_answer_bytes
    pieces = TextParts()  # a local model's tokens, kept compactly
    size = 0  # UTF-8 bytes so far, against LLMGW_MAX_ANSWER_BYTES
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    truncated = False
    with gateway.traced_call(request, actor, target, payload, "stream") as call:
        call.partial = lambda: orjson.dumps({"text": pieces.text()}).decode() if pieces else ""
        response = await open_stream(
            gateway.deps.http,
            target,
            plan.http_request.url,
            payload,
            gateway.call_options(deadline, call.span),
        )
        with released_when_done(response):
            finished = False
            batches = (
                _ndjson_batches(response, provider=target.provider, scrub=scrub)
                if stream_framing(plan.endpoint_type) == "ndjson"
                else sse_batches(response, provider=target.provider, scrub=scrub)
            )
            # What one network read brought is relayed as one delta, as on the OpenAI-compatible
            # path: one message per token cost a gRPC message per ~60 bytes a fast server sent.
            async for batch in batches:
                texts: list[str] = []
                done = False
                for event in batch:
                    if event is None:  # [DONE]
                        done = True
                        break
                    chunk = parse_stream_event(plan.endpoint_type, event)
                    if chunk.prompt_tokens is not None:
                        prompt_tokens = chunk.prompt_tokens
                    if chunk.completion_tokens is not None:
                        completion_tokens = chunk.completion_tokens
                    finished = finished or chunk.done
                    truncated = truncated or chunk.truncated
                    if chunk.text:
                        size += text_bytes(chunk.text)
                        if size > limit:
                            raise answer_too_large(target.provider, limit, size)
                        pieces.append(chunk.text)
                        texts.append(chunk.text)
                if texts:
                    call.first_token()
                    delta = chat_pb2.ChatCompletionDelta(content="".join(texts))
                    for scrubbed in scrubber.events((chat_pb2.StreamCreateResponse(delta=delta),)):
                        yield scrubbed
                if done:
                    finished = True
                    break
            if not finished:
                raise UpstreamBadResponse(
                    f"{target.provider} ended the stream before it was complete",
                    metadata={"provider": target.provider},
                )
        for scrubbed in scrubber.flush():
            yield scrubbed
        text = pieces.text()
        call.record.response_json = orjson.dumps({"text": text}).decode()
        try:
            answer = await plan.completion_json(text, prompt_tokens, completion_tokens, truncated)
            tool_call_check.enforce(answer, plan.want, call.record, provider=target.provider)
        except GatewayError:
            keep_counts(call.record, prompt_tokens, completion_tokens)
            raise
        call.completion = completion_from_json(answer, provider=target.provider)
        scrubber.completion(call.completion)
        if request.final_completion_without_deltas:
            streamed = scrubber.streamed([(text, "", ())])
            if not plan.functions:  # the plain answer is the deltas' text, only stripped
                streamed = [(content.strip(), "", ()) for content, _, _ in streamed]
            leave_out_streamed(call.completion, streamed)
        # Inside the scope, as in Gateway.stream: a final message the client refuses is traced.
        yield chat_pb2.StreamCreateResponse(completion=call.completion, provider_trace_id=call.record.id)


async def _ndjson_batches(
    response: Response, *, provider: str, scrub: Callable[[str], str]
) -> AsyncIterator[list[dict[str, Any] | None]]:
    """Ollama streams one JSON object per line (each at most MAX_EVENT_BYTES): the objects one
    network read completed, together; an error comes after the objects before it."""
    lines = LineReader()
    try:
        while piece := await response.read_chunk():
            batch: list[dict[str, Any] | None] = []
            try:
                for line in lines.feed(piece):
                    if len(line) > openai_compat.MAX_EVENT_BYTES:
                        raise event_too_large(provider)
                    if line.strip():
                        batch.append(parse_json_object(line, provider=provider, scrub=scrub))
                if lines.held > openai_compat.MAX_EVENT_BYTES:
                    raise event_too_large(provider)
            except GatewayError:
                if batch:
                    yield batch
                raise
            if batch:
                yield batch
    except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
        raise broken_stream(exc, provider, scrub) from exc
    rest = lines.rest()
    if rest.strip():
        yield [parse_json_object(rest, provider=provider, scrub=scrub)]


__all__ = ["GatewayError", "create_local", "prompt_parts", "stream_local"]
