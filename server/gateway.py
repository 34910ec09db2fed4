"""The request path: validate, plan, call the upstream, convert, trace.

Servicers (`server.api`) hand proto requests to `Gateway` and get proto answers or a
`GatewayError` back; everything between the two edges lives here and in `server.core`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

import orjson
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2

from server import metrics
from server.auth.actor import Actor
from server.auth.redact import Redactor
from server.billing.meter import Meter
from server.config import Settings
from server.core import offload, reasoning_only, tokens, tool_call_check, trace_scrub
from server.core.answer_scrub import AnswerScrubber
from server.core.completion import (
    answer_bytes,
    check_answer_size,
    completion_from_json,
    leave_out_streamed,
    plain_event,
    streamed_texts,
)
from server.core.config_cache import ConfigCache
from server.core.keys import (
    ByokLookup,
    ByokUrls,
    EndpointChecker,
    TargetCache,
    counting_endpoint,
    resolve_target,
)
from server.core.openai_request import (
    SentFunctions,
    build_chat_body,
    prompt_functions,
    unpack_completion,
)
from server.core.relay import plain_wire, relayed
from server.core.retry import Deadline
from server.core.stream import StreamAccumulator
from server.core.validation import (
    LOCAL_TYPES,
    FunctionKeys,
    MessageFields,
    function_keys_async,
    function_keys_rest,
    function_keys_started,
    off_loop,
    validate_request,
)
from server.errors import (
    ContextWindowExceeded,
    DeadlineExceeded,
    GatewayError,
    ShuttingDown,
    ToolCallMissing,
    UpstreamBadResponse,
)
from server.inflight import InFlightCall, cancel_cause, current_call
from server.limits.limiter import Admission, Limiter
from server.providers.base import Provider, UpstreamTarget
from server.providers.http import HttpClient
from server.providers.local.provider import create_local, prompt_parts, stream_local
from server.providers.openai_compat import (
    CallOptions,
    answer_is_body_json,
    open_stream,
    post_json,
    released_when_done,
    sse_batch_reader,
)
from server.providers.registry import provider_for
from server.routing.attempts import Attempt
from server.routing.router import Router, wants_routing
from server.traces.base import TraceRecord, new_trace_id, trace_notes, trace_owner

log = logging.getLogger("llmgateway.gateway")

ChatRequest = chat_pb2.CreateRequest  # StreamCreateRequest/CountTokensRequest are wire-identical
# How a call ends unfinished: the caller cancelled, its deadline passed, shutdown cut it; its
# request may have reached the upstream, which bills what it processed (server.limits settles).
_UNFINISHED = (asyncio.CancelledError, GeneratorExit, DeadlineExceeded, ShuttingDown)


class TraceSink(Protocol):
    """Where finished trace records go (the trace writer); enqueue never blocks."""

    def enqueue(self, record: TraceRecord) -> None: ...

    def enqueue_after(self, record: TraceRecord, ready: Awaitable[object]) -> None: ...


@dataclass(slots=True)
class Dependencies:
    """What the gateway calls out to; built once in `server.app`."""

    settings: Settings
    http: HttpClient
    traces: TraceSink
    policy: EndpointChecker
    byok_provider: ByokLookup
    byok_urls: ByokUrls
    scrub: Callable[[str], str]
    tracer: Any = None  # an OpenTelemetry tracer when an exporter is configured, else None
    redactor: Redactor | None = None  # the known secrets, scrubbed from answers too
    router: Router | None = None  # LLMGW_ROUTES_FILE's routes (None: no routes file)
    meter: Meter | None = None  # prices each answer (server.billing); None: no cost
    limiter: Limiter | None = None  # limits per key and organization (server.limits)


@dataclass(slots=True)
class Plan:
    """Where a call goes and what it sends: the internal (OpenAI-shaped) body the answer is
    unpacked against, and the provider's own body."""

    target: UpstreamTarget
    provider: Provider
    body: dict[str, Any]
    payload: bytes
    count: tokens.TokenCount | None
    notes: list[str]  # parameters not sent as given, for the trace
    config_key: bytes | None = None  # the request's LLMConfig serialized (`Gateway._create`)


@dataclass(slots=True)
class TracedCall:
    """What a call in progress fills in: its answer, its first token, its partial answer."""

    record: TraceRecord
    span: Any
    started: float
    partial: Callable[[], str] | None = None  # the answer so far, kept if the call fails
    meter: Meter | None = None
    _completion: chat_pb2.ChatCompletion | None = None

    @property
    def completion(self) -> chat_pb2.ChatCompletion | None:
        return self._completion

    @completion.setter
    def completion(self, value: chat_pb2.ChatCompletion | None) -> None:
        # Priced as it is set, before the answer leaves (every path sets it then): its cost goes
        # in its Usage and on the trace (None, never "0", when the model has no price).
        self._completion = value
        if value is not None and self.meter is not None:
            record = self.record
            if self.meter.price(record.model_endpoint_type, record.model, value.usage) is not None:
                record.cost_usd = value.usage.cost_usd

    def first_token(self) -> None:
        if not self.record.time_to_first_token_ms:
            self.record.time_to_first_token_ms = (time.perf_counter() - self.started) * 1000.0


class Gateway:
    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps
        self._settings = deps.settings
        # key -> (the redactor's generation when scrubbed, the scrubbed JSON)
        self._config_json_cache: ConfigCache[bytes, tuple[int, str]] = ConfigCache()
        self._targets = TargetCache()  # server-key targets (this gateway's settings and policy)
        self.router = deps.router or Router(deps.settings)

    # -- CountTokens -------------------------------------------------------------------------

    async def count_tokens(self, request: ChatRequest, actor: Actor) -> chat_pb2.CountTokensResponse:
        """The counts the guard of Create would use for this request and caller."""
        if wants_routing(request):  # counted for the deployment Create would likely try first
            self.router.for_counting(request, actor)
        keys = await function_keys_async(request.functions)
        off = off_loop(keys)  # a huge function set: its work runs in the offload pool
        await offload.run_if(off, lambda: validate_request(request, keys))
        config = request.llm_config
        if config.model_endpoint_type in LOCAL_TYPES:
            messages, functions = await offload.run_if(off, lambda: prompt_parts(request))
        else:
            # The prompt depends on the endpoint (LM Studio's inner-thoughts description): count
            # it for the endpoint Create would call, a BYOK provider's base URL included.
            endpoint = await counting_endpoint(
                config, settings=self._settings, actor=actor, byok_provider=self.deps.byok_provider
            )
            body, functions = await offload.run_if(
                off,
                lambda: (
                    build_chat_body(request, stream=False, endpoint=endpoint, keys=keys),
                    prompt_functions(request, endpoint=endpoint, keys=keys),
                ),
            )
            messages = body["messages"]
        count = await tokens.count_request_tokens_async(messages, functions, config.model, off=off)
        return chat_pb2.CountTokensResponse(
            prompt_tokens=count.prompt_tokens,
            function_tokens=count.function_tokens,
            total_tokens=count.total_tokens,
            context_window=config.context_window,
            encoding=count.encoding,
        )

    async def guard(
        self,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        *,
        off: bool = False,
    ) -> tokens.TokenCount | None:
        """Refuse a prompt that cannot fit, before a byte leaves (0 means no window is known).

        `off`: a huge function set (`validation.off_loop`), counted whole in the offload pool."""
        window = request.llm_config.context_window
        if window <= 0:
            return None
        # Inline for a normal request; a large one finishes in the offload pool (tokens.py).
        model = request.llm_config.model
        if off:
            count = await tokens.count_request_tokens_async(messages, functions, model, off=True)
        else:
            started = tokens.start_request_count(messages, functions, model)
            count = started if isinstance(started, tokens.TokenCount) else await tokens.finish_count(started)
        _refuse_over(window, count)
        return count

    # -- planning ----------------------------------------------------------------------------

    async def _plan(
        self,
        request: ChatRequest,
        actor: Actor,
        *,
        stream: bool,
        keys: FunctionKeys,
        via: Attempt | None = None,
        config_key: bytes | None = None,
        read: list[MessageFields] | None = None,
        off: bool | None = None,
    ) -> Plan:
        """`config_key`: `request.llm_config` serialized, shared by the caches keyed by it;
        `read`: the messages' fields as validation read them (`validate_request`'s result);
        `off`: `off_loop(keys)`, if the caller made it already (None: made here)."""
        config = request.llm_config
        provider = provider_for(config.model_endpoint_type, self._settings)
        # A routed attempt may bring its deployment's own target (a key of the routes file).
        target = (
            via.target
            if via is not None and via.target is not None
            else await resolve_target(
                config,
                settings=self._settings,
                actor=actor,
                policy=self.deps.policy,
                byok_provider=self.deps.byok_provider,
                byok_urls=self.deps.byok_urls,
                dialect=provider,
                cache=self._targets,
            )
        )
        # Count the functions as sent to this endpoint (the inner-thoughts text depends on it).
        if off is None:  # a huge function set: converted (strict too) and counted in the pool
            off = off_loop(keys)
        endpoint = target.base_url
        if off:
            body, functions = await offload.run(
                lambda: (
                    build_chat_body(
                        request, stream=stream, endpoint=endpoint, keys=keys, config_key=config_key, read=read
                    ),
                    prompt_functions(request, endpoint=endpoint, keys=keys),
                )
            )
            count = await self.guard(request, body["messages"], functions, off=True)
            # The provider's translation walks every schema again (Gemini converts them): a
            # huge function set is translated and serialized in the pool too.
            notes, raw = await offload.run(lambda: _translated(provider, body, stream))
        else:  # plain calls, as in `_create`; the guard's, as `guard` counts inline
            body = build_chat_body(
                request, stream=stream, endpoint=endpoint, keys=keys, config_key=config_key, read=read
            )
            functions = prompt_functions(request, endpoint=endpoint, keys=keys)
            count = None
            window = config.context_window
            if window > 0:
                started = tokens.start_request_count(body["messages"], functions, config.model)
                count = (
                    started if isinstance(started, tokens.TokenCount) else await tokens.finish_count(started)
                )
                _refuse_over(window, count)
            notes, raw = _translated(provider, body, stream)
        if notes:
            log.info("%s: parameters not sent as given: %s", target.provider, ", ".join(notes))
        return Plan(target, provider, body, raw, count, trace_notes(notes, self.deps.scrub), config_key)

    def answer_scrubber(self, target: UpstreamTarget) -> AnswerScrubber:
        """Scrubs the answer of a call to `target` of every known secret and of the key it sent."""
        return AnswerScrubber(self.deps.redactor, target.secrets)

    def call_options(self, deadline: Deadline, span: Any, via: Attempt | None = None) -> CallOptions:
        # `server.core.retry` logs every retry decision and adds it to the current span itself.
        return CallOptions(
            deadline=deadline,
            retry=via.retry if via is not None else self._settings.retry,
            default_timeout=self._settings.upstream_timeout,
            scrub=self.deps.scrub,
        )

    def new_trace(
        self,
        request: ChatRequest,
        actor: Actor,
        target: UpstreamTarget | None,
        body: bytes,
        config_key: bytes | None = None,
    ) -> TraceRecord:
        config = request.llm_config
        trace = request.trace
        endpoint_type = config.model_endpoint_type
        # A slice, not list(): the repeated field iterates by index until IndexError (a raised
        # exception per call, even with no tags, the usual case).
        tags = trace.tags
        # The first fields positionally, in TraceRecord's order, the three later ones set after:
        # keywords to a dataclass cost a dict per call (~2,000 instructions more than setting
        # them); test_new_trace_fills_every_field checks each field.
        record = TraceRecord(
            new_trace_id(),  # id
            datetime.now(UTC),  # created_at
            actor.organization_id,
            request.user_id or actor.user_id,  # user_id
            trace.step_id,
            trace.agent_id,
            tags[:] if tags else [],  # agent_tags: a list of its own
            trace.run_id,
            trace.call_type or "agent_step",
            target.provider if target else endpoint_type,  # provider
            config.model,
            endpoint_type,  # model_endpoint_type
            bool(target and target.is_byok),  # is_byok
            trace_scrub.scrub_request(body.decode(), self.deps.scrub),  # request_json; huge: at finish
        )
        record.llm_config_json = self._config_json(config, config_key)
        record.owner = trace_owner(user_id=actor.user_id, key_id=actor.key_id)  # never the request's
        record.key_id = actor.key_id
        return record

    def _config_json(self, config: chat_pb2.LLMConfig, key: bytes | None = None) -> str:
        """The trace's copy of the LLMConfig, scrubbed; cached, as an agent resends the same one.

        `key`: `config.SerializeToString()` if the caller made it already."""
        if key is None:
            key = config.SerializeToString()
        # Read before scrubbing: a secret added meanwhile moves it on, and the copy is made again.
        redactor = self.deps.redactor
        generation = redactor.generation if redactor is not None else 0
        cached = self._config_json_cache.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        text = self.deps.scrub(json_format.MessageToJson(config, indent=None))
        # Bounded in entries and key bytes; a caller's huge config is never kept (config_cache).
        self._config_json_cache.put(key, (generation, text), len(key))
        return text

    def span(
        self, name: str, config: chat_pb2.LLMConfig, target: UpstreamTarget
    ) -> AbstractContextManager[Any]:
        tracer = self.deps.tracer
        if tracer is None:
            return nullcontext(None)
        return tracer.start_as_current_span(  # type: ignore[no-any-return]
            f"chat {config.model}",
            kind=_client_kind(),
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": target.provider,
                "gen_ai.provider.name": target.provider,
                "gen_ai.request.model": config.model,
                "llmgateway.stream": name == "stream",
            },
        )

    def finish_trace(
        self,
        record: TraceRecord,
        started: float,
        error: BaseException | None,
        in_flight: InFlightCall | None = None,
    ) -> None:
        """Complete the record and queue it; `in_flight` says why a cancelled call was cancelled."""
        record.latency_ms = (time.perf_counter() - started) * 1000.0
        if error is None:  # the usual case first: no isinstance tests (nor a union type made)
            pass
        elif isinstance(error, GatewayError):
            record.error_type = error.reason
            record.error_message = self.deps.scrub(error.message)
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            # The caller cancelling, its deadline passing and shutdown all arrive as a cancellation.
            record.error_type, record.error_message = cancel_cause(in_flight or current_call())
        else:
            record.error_type = type(error).__name__
            record.error_message = self.deps.scrub(str(error))
        # The answer (and a huge request) scrubbed, in the offload pool when huge, then queued.
        trace_scrub.queue(record, self.deps.scrub, self.deps.traces)
        metrics.record_trace(record)

    def traced_call(
        self,
        request: ChatRequest,
        actor: Actor,
        target: UpstreamTarget,
        payload: bytes,
        kind: str,
        via: Attempt | None = None,
        config_key: bytes | None = None,
    ) -> _TraceScope:
        """One upstream call: its span and its trace record, finished however the call ends.

        A plain (synchronous) context manager: entering and leaving awaits nothing, and this is
        on every request's path (an async generator-based one cost several microseconds more).
        `config_key`: `request.llm_config` serialized, if made already (`Plan.config_key`).
        """
        return _TraceScope(self, request, actor, target, payload, kind, via, config_key)

    # -- Create ------------------------------------------------------------------------------

    async def create(
        self,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        via: Attempt | None = None,
        *,
        routed: bool | None = None,
    ) -> chat_pb2.CreateResponse:
        """`routed`: `wants_routing(request)`, if the caller asked already (None: asked here)."""
        if via is not None:  # one attempt of a routed call: the call was admitted as a whole
            return await self._create(request, actor, deadline, via, via.admission)
        limiter = self.deps.limiter
        if limiter is None or not limiter.may_apply(actor):
            return await self._create_routed_or_direct(request, actor, deadline, None, routed)
        admission = limiter.admission(actor, request)
        response = None
        try:
            response = await self._create_routed_or_direct(request, actor, deadline, admission, routed)
        except _UNFINISHED:  # the upstream may have billed what never came back
            admission.settle_unfinished(None)
            raise
        finally:
            admission.settle(response.completion.usage if response is not None else None)
        return response

    async def _create_routed_or_direct(
        self,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        admission: Admission | None,
        routed: bool | None = None,
    ) -> chat_pb2.CreateResponse:
        if routed is None:
            routed = wants_routing(request)
        if routed:  # a route or fallbacks: each attempt comes back to create()
            return await self.router.create(self, request, actor, deadline, admission)
        return await self._create(request, actor, deadline, None, admission)

    async def _create(
        self,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        via: Attempt | None,
        admission: Admission | None,
    ) -> chat_pb2.CreateResponse:
        # The cache key of all function handling below. Plain calls for a normal request (a
        # coroutine and a lambda per step cost more than some of the steps themselves).
        functions = request.functions
        started = function_keys_started(functions)
        # A huge function set: the rest is serialized in the offload pool.
        keys = (
            tuple(started) if len(started) == len(functions) else await function_keys_rest(functions, started)
        )
        # The LLMConfig serialized once for the caches keyed by it (validation's, the body's, the
        # trace's copy): nothing changes the request's config during the call (a routed call
        # sets it before each attempt, and each attempt comes here).
        config_key = request.llm_config.SerializeToString()
        # The messages' fields as validation read them: the body is built from them (nothing
        # changes the request's messages during the call; a routed attempt comes here anew).
        off = off_loop(keys)  # once: validation and the plan below both ask
        if off:
            read = await offload.run(lambda: validate_request(request, keys, config_key))
        else:
            read = validate_request(request, keys, config_key)
        if request.llm_config.model_endpoint_type in LOCAL_TYPES:
            if admission is not None:
                await admission.admit(None)  # QUOTA_EXCEEDED here: nothing went upstream
            try:
                return await self._create_local(request, actor, deadline, keys)
            except ToolCallMissing:
                if not self._settings.tool_call_missing_retry:
                    raise
            return await self._create_local(request, actor, deadline, keys)
        plan = await self._plan(
            request, actor, stream=False, keys=keys, via=via, config_key=config_key, read=read, off=off
        )
        if admission is not None:
            await admission.admit(plan.count)  # the guard's count; QUOTA_EXCEEDED: nothing sent
        try:
            return await self._create_once(request, actor, deadline, plan, via)
        except ToolCallMissing:
            if not tool_call_check.ask_again(plan.body, plan.target.base_url, settings=self._settings):
                raise
        # Planned again: a server just learned to be llama.cpp's gets the form it honours.
        plan = await self._plan(
            request, actor, stream=False, keys=keys, via=via, config_key=config_key, read=read, off=off
        )
        return await self._create_once(request, actor, deadline, plan, via)

    async def _create_once(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, plan: Plan, via: Attempt | None
    ) -> chat_pb2.CreateResponse:
        target, body, model = plan.target, plan.body, request.llm_config.model
        with self.traced_call(request, actor, target, plan.payload, "create", via, plan.config_key) as call:
            call.record.notes = plan.notes
            raw, answer = await post_json(
                self.deps.http,
                target,
                plan.provider.endpoint_url(target.base_url, model, stream=False),
                plan.payload,
                self.call_options(deadline, call.span, via),
                dialect=plan.provider,
                model=model,
            )
            call.record.response_json = raw.decode("utf-8", "replace")
            limit = self._settings.max_answer_bytes
            # The answer's texts are fewer bytes than a body it was decoded from: a body within
            # the cap needs no walk (`answer_is_body_json`). A translated answer is walked.
            if len(raw) > limit or not answer_is_body_json(plan.provider):
                check_answer_size(answer_bytes(answer), limit, provider=target.provider)
            unpack_completion(answer, request, body)
            want = tool_call_check.expected(request, body, endpoint=target.base_url, answer=answer)
            tool_call_check.enforce(answer, want, call.record, provider=target.provider)
            reasoning_only.enforce(answer, call.record, provider=target.provider)
            response = chat_pb2.CreateResponse(provider_trace_id=call.record.id)
            call.completion = completion_from_json(answer, provider=target.provider, into=response.completion)
            self.answer_scrubber(target).completion(response.completion)  # an upstream may echo a key
        return response

    # -- StreamCreate ------------------------------------------------------------------------

    def stream(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, via: Attempt | None = None
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        if via is not None:  # one attempt of a routed call: the call was admitted as a whole
            return self._stream(request, actor, deadline, via, via.admission)
        limiter = self.deps.limiter
        if limiter is None or not limiter.may_apply(actor):
            return self._stream_routed_or_direct(request, actor, deadline, None)
        return self._limited_stream(limiter, request, actor, deadline)

    def stream_wire(
        self, request: ChatRequest, actor: Actor, deadline: Deadline
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse | bytes]:
        """`stream`, for the servicer: the usual delta of a direct call (no router, no limits
        to count it) comes as its wire bytes (`relay.plain_wire`), what the response serializer
        would have made of its event; every other event as `stream` gives it."""
        limiter = self.deps.limiter
        if (limiter is None or not limiter.may_apply(actor)) and not wants_routing(request):
            return self._stream(request, actor, deadline, None, None, wire=True)
        return self.stream(request, actor, deadline)

    async def _limited_stream(
        self, limiter: Limiter, request: ChatRequest, actor: Actor, deadline: Deadline
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        admission = limiter.admission(actor, request)
        last = None
        relayed = 0  # characters of answer relayed: what an unfinished stream counts (4 a token)
        try:
            async for event in self._stream_routed_or_direct(request, actor, deadline, admission):
                if event.HasField("completion"):
                    last = event.completion
                else:
                    delta = event.delta
                    relayed += len(delta.content) + len(delta.reasoning_content)
                    for piece in delta.tool_calls:
                        relayed += len(piece.name) + len(piece.arguments)
                yield event
        except BaseException as exc:
            # Cancelled or cut after the upstream answered part of it: billed, so counted.
            if last is None and (relayed or isinstance(exc, _UNFINISHED)):
                admission.settle_unfinished((relayed + 3) // 4 if relayed else None)
            raise
        finally:
            admission.settle(last.usage if last is not None else None)

    def _stream_routed_or_direct(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, admission: Admission | None
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        if wants_routing(request):  # falls back only before the first event
            return self.router.stream(self, request, actor, deadline, admission)
        return self._stream(request, actor, deadline, None, admission)

    async def _stream(
        self,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        via: Attempt | None,
        admission: Admission | None,
        wire: bool = False,
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        # As in `_create`: plain calls for a normal request (an awaited coroutine and a lambda
        # per step were a fixed cost of every stream), the pool only for a huge function set.
        functions = request.functions
        started = function_keys_started(functions)
        keys = (
            tuple(started) if len(started) == len(functions) else await function_keys_rest(functions, started)
        )
        config_key = request.llm_config.SerializeToString()  # shared, as in `_create`
        if off_loop(keys):
            await offload.run(lambda: validate_request(request, keys, config_key))
        else:
            validate_request(request, keys, config_key)
        if request.llm_config.model_endpoint_type in LOCAL_TYPES:
            if admission is not None:
                await admission.admit(None)  # QUOTA_EXCEEDED here: nothing went upstream
            async for event in self._stream_local(request, actor, deadline, keys):
                yield event
            return
        plan = await self._plan(request, actor, stream=True, keys=keys, via=via, config_key=config_key)
        if admission is not None:
            await admission.admit(plan.count)  # the guard's count; QUOTA_EXCEEDED: nothing sent
        # One upstream call per pass; a second pass only for a missing tool call. The call is
        # written out here rather than in a generator of its own: every chunk of every stream
        # went through one more generator layer (two frame resumptions per chunk).
        again = False
        while True:
            target, model = plan.target, request.llm_config.model
            relayed_text = False  # a delta the caller cannot take back went out (carries_text)
            try:
                # Over LLMGW_MAX_ANSWER_BYTES the accumulator raises before the piece is kept or relayed.
                accumulator = StreamAccumulator(
                    provider=target.provider, max_answer_bytes=self._settings.max_answer_bytes
                )
                scrubber = self.answer_scrubber(target)  # an upstream may echo a key, even split over chunks
                want = tool_call_check.expected(request, plan.body, endpoint=target.base_url)
                with self.traced_call(request, actor, target, plan.payload, "stream", via) as call:
                    call.record.notes = plan.notes
                    call.partial = _partial_answer(accumulator)
                    response = await open_stream(
                        self.deps.http,
                        target,
                        plan.provider.endpoint_url(target.base_url, model, stream=True),
                        plan.payload,
                        self.call_options(deadline, call.span, via),
                        dialect=plan.provider,
                        model=model,
                    )
                    with released_when_done(response):
                        done = False
                        first = True
                        add = accumulator.add
                        # What one network read brought is relayed together: consecutive pieces
                        # of the same kind are merged into one delta event (deltas_from_chunks
                        # says which). Read by the SSE parser's own next_batch: sse_batches'
                        # generator was one more layer for every read.
                        next_batch = sse_batch_reader(
                            response, provider=target.provider, scrub=self.deps.scrub
                        )
                        while batch := await next_batch():
                            if len(batch) == 1 and (chunk := batch[0]) is not None:
                                # The usual read: one chunk. Text content alone with nothing to
                                # scrub is one event, as `relayed` makes it (inlined: every chunk).
                                plain = add(chunk)  # plain_choice(chunk), found by the way
                                if plain is not None and scrubber.lets_out(plain[1]):
                                    if first:
                                        first = False
                                        call.first_token()
                                    relayed_text = True  # (text content)
                                    # (typed as events: the servicer's stream_wire alone says wire)
                                    yield plain_wire(*plain) if wire else plain_event(*plain)  # type: ignore[misc]
                                    continue
                            else:
                                for chunk in batch:
                                    if chunk is None:
                                        done = True
                                        break
                                    add(chunk)
                            for event in relayed(batch, want, scrubber):
                                if first:
                                    first = False
                                    call.first_token()
                                relayed_text = relayed_text or tool_call_check.carries_text(event)
                                yield event
                            if done:
                                break
                        if not done and not accumulator.finished:
                            raise UpstreamBadResponse(
                                f"{target.provider} ended the stream before it was complete",
                                metadata={"provider": target.provider, "chunks": accumulator.chunks},
                            )
                    for event in scrubber.flush():
                        relayed_text = relayed_text or tool_call_check.carries_text(event)
                        yield event
                    last = await self._final_event(request, plan, keys, accumulator, scrubber, want, call)
                    # Inside the scope: the trace is finished once grpc asks for the next message,
                    # i.e. after this one was written; a send that fails (a client's receive limit)
                    # closes this generator here, and the trace says so instead of success.
                    yield last
                return
            except ToolCallMissing:
                # Asked again once, only while no text was relayed: the caller cannot take deltas back.
                if (
                    again
                    or relayed_text
                    or not tool_call_check.ask_again(plan.body, plan.target.base_url, settings=self._settings)
                ):
                    raise
            again = True
            plan = await self._plan(request, actor, stream=True, keys=keys, via=via)

    async def _final_event(
        self,
        request: ChatRequest,
        plan: Plan,
        keys: FunctionKeys,
        accumulator: StreamAccumulator,
        scrubber: AnswerScrubber,
        want: tool_call_check.Expected,
        call: TracedCall,
    ) -> chat_pb2.StreamCreateResponse:
        """A relayed stream's last event: the assembled completion (usage counted here if the
        upstream sent none), checked for the tool call asked of it and scrubbed."""
        target, body, count = plan.target, plan.body, plan.count
        answer = accumulator.completion()
        if accumulator.usage is None:
            if count is None:  # no window, so the guard counted nothing: count for usage
                off = off_loop(keys)  # a huge function set: prepared in the pool, as in _plan
                functions = await offload.run_if(
                    off, lambda: prompt_functions(request, endpoint=target.base_url, keys=keys)
                )
                count = await tokens.count_request_tokens_async(
                    body["messages"], functions, request.llm_config.model, off=off
                )
            answer["usage"] = await _local_usage(answer, count, request)
        call.record.response_json = orjson.dumps(answer).decode()
        tool_call_check.enforce(answer, want, call.record, provider=target.provider)
        # In place of the final completion, as TOOL_CALL_MISSING: the reasoning was relayed.
        reasoning_only.enforce(answer, call.record, provider=target.provider)
        streamed = streamed_texts(answer) if request.final_completion_without_deltas else None
        unpack_completion(answer, request, body)
        last = chat_pb2.StreamCreateResponse(provider_trace_id=call.record.id)
        call.completion = completion_from_json(answer, provider=target.provider, into=last.completion)
        scrubber.completion(last.completion)
        if streamed is not None:
            leave_out_streamed(last.completion, scrubber.streamed(streamed))
        return last

    # -- local servers (server.providers.local, called with this gateway as its CallHost) ------

    async def _create_local(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, keys: FunctionKeys = ()
    ) -> chat_pb2.CreateResponse:
        return await create_local(self, request, actor, deadline, off=off_loop(keys))

    async def _stream_local(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, keys: FunctionKeys = ()
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        async for event in stream_local(self, request, actor, deadline, off=off_loop(keys)):
            yield event


def _refuse_over(window: int, count: tokens.TokenCount) -> None:
    """CONTEXT_WINDOW_EXCEEDED when the counted prompt does not fit `window` (> 0)."""
    if count.total_tokens > window:
        raise ContextWindowExceeded(
            f"Request exceeds maximum context length ({count.total_tokens} > {window} tokens)",
            metadata={
                "prompt_tokens": count.prompt_tokens,
                "function_tokens": count.function_tokens,
                "total_tokens": count.total_tokens,
                "context_window": window,
                "encoding": count.encoding,
            },
        )


_EXACT_COPY_LIMIT = 1 << 20


def _translated(provider: Provider, body: dict[str, Any], stream: bool) -> tuple[list[str], bytes]:
    """The provider's upstream body, serialized, and its notes."""
    upstream, notes = provider.build_body(body, stream=stream)
    tools = upstream.get("tools")
    if type(tools) is SentFunctions and tools.shared and (fragment := tools.json()) is not None:
        # The cached tool list, as it serialized the first time: the same bytes (a copy of the
        # dict, `tools` keeps its place; `body` itself is unpacked against, never changed).
        upstream = {**upstream, "tools": fragment}
    # orjson hands back its working buffer, ~8x the text (a 2 KB body held a 16 KB block), and
    # the payload lives as long as the call (retries re-send it): an exact copy frees the rest.
    # Not above 1 MiB: such a buffer's unused tail is pages never touched (no RSS), and copying
    # a 60 MB body would hold the loop ~30 ms more.
    raw = orjson.dumps(upstream)
    return notes, memoryview(raw).tobytes() if len(raw) <= _EXACT_COPY_LIMIT else raw


def _partial_answer(accumulator: StreamAccumulator) -> Callable[[], str]:
    """The answer so far as JSON, for the trace of a stream that fails ("" before any chunk)."""
    return lambda: orjson.dumps(accumulator.completion()).decode() if accumulator.chunks else ""


def _client_kind() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.CLIENT


def record_success(record: TraceRecord, span: Any, completion: chat_pb2.ChatCompletion) -> None:
    """Usage of a successful call onto its trace record and its span."""
    _record_usage(record, completion.usage)
    span_usage(span, completion)


def _record_usage(record: TraceRecord, usage: chat_pb2.Usage) -> None:
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.total_tokens = usage.total_tokens
    record.cached_tokens = usage.cached_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    record.cache_write_tokens = usage.cache_write_tokens


def span_usage(span: Any, completion: chat_pb2.ChatCompletion) -> None:
    if span is None:
        return
    span.set_attribute("gen_ai.response.model", completion.model)
    span.set_attribute("gen_ai.response.id", completion.id)
    span.set_attribute("gen_ai.usage.input_tokens", completion.usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", completion.usage.completion_tokens)
    span.set_attribute(
        "gen_ai.response.finish_reasons",
        [
            chat_pb2.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()
            for c in completion.choices
        ],
    )


async def _local_usage(
    answer: dict[str, Any], count: tokens.TokenCount | None, request: ChatRequest
) -> dict[str, int]:
    """Usage counted here when the upstream sent none (the seed counted one token per chunk)."""
    texts: list[str] = []
    for choice in answer["choices"]:
        message = choice["message"]
        for text in (message.get("content"), message.get("reasoning_content")):
            if text:
                texts.append(text)
        for call in message.get("tool_calls") or ():
            texts.append(call["function"]["name"] + call["function"]["arguments"])
    # A long answer (megabytes, from an upstream that sends no usage) is counted off the loop.
    completion_tokens = await tokens.count_texts_async(texts, request.llm_config.model)
    prompt_tokens = count.total_tokens if count is not None else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _TraceScope:
    """`Gateway.traced_call`: opens the span and the record on entry, finishes both on exit."""

    __slots__ = (
        "_gateway",
        "_request",
        "_actor",
        "_target",
        "_payload",
        "_kind",
        "_call",
        "_span_scope",
        "_in_flight",
        "_via",
        "_config_key",
    )

    def __init__(
        self,
        gateway: Gateway,
        request: ChatRequest,
        actor: Actor,
        target: UpstreamTarget,
        payload: bytes,
        kind: str,
        via: Attempt | None = None,
        config_key: bytes | None = None,
    ) -> None:
        self._gateway = gateway
        self._request = request
        self._actor = actor
        self._target = target
        self._payload = payload
        self._kind = kind
        self._call: TracedCall | None = None
        self._span_scope: AbstractContextManager[Any] | None = None
        # Taken now: a stream abandoned mid-way is closed later, maybe from another task.
        self._in_flight = current_call()
        self._via = via
        self._config_key = config_key

    def __enter__(self) -> TracedCall:
        gateway = self._gateway
        record = gateway.new_trace(self._request, self._actor, self._target, self._payload, self._config_key)
        started = time.perf_counter()
        # Without a tracer (no exporter configured: the usual setup) there is no span, and no
        # nullcontext to make, enter and leave on every call.
        span_scope = None
        span = None
        if gateway.deps.tracer is not None:
            span_scope = gateway.span(self._kind, self._request.llm_config, self._target)
            span = span_scope.__enter__()
        self._span_scope = span_scope
        # Positionally (record, span, started, partial, meter): keywords cost more on every call.
        self._call = TracedCall(record, span, started, None, gateway.deps.meter)
        return self._call

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        call, span_scope = self._call, self._span_scope
        assert call is not None
        record, gateway = call.record, self._gateway
        if self._via is not None:
            # Route, deployment and the call's attempts so far; a stream's first event overdue
            # (the deployment's timeout_seconds) arrives as a cancellation: recorded as that timeout.
            exc = self._via.annotate(record, exc)
            exc_type = type(exc) if exc is not None else None
        try:
            if exc is None:
                completion = call.completion  # a property: read once
                if completion is not None:
                    record_success(record, call.span, completion)
                gateway.finish_trace(record, call.started, None)
            else:
                if call.partial is not None and not record.response_json:
                    # What came before the failure is evidence; keep it with the error.
                    try:
                        record.response_json = call.partial()
                    except Exception:  # noqa: BLE001 - the trace must be written whatever the answer held
                        log.warning("could not keep the partial answer of trace %s", record.id)
                if isinstance(exc, GatewayError) and exc.trace_body and not record.response_json:
                    record.response_json = exc.trace_body  # the upstream's error body, scrubbed
                if isinstance(exc, GatewayError) and gateway.deps.redactor is not None:
                    # Before the span records it: an upstream may have put a key in a value.
                    gateway.deps.redactor.redact_error(exc)
                gateway.finish_trace(record, call.started, exc, self._in_flight)
        finally:
            if span_scope is not None:  # None: no tracer, no span
                span_scope.__exit__(exc_type, exc, tb)  # the exception, if any, goes on
