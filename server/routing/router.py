"""The fallback loop: a routed request is tried on one deployment after another, inside the
caller's deadline, until one answers or the failure is one no other deployment can fix.

Order of candidates: the route's deployments (weighted random among the healthy ones), then
each fallback route's (depth first, each route once), then the request's inline `fallbacks` in
order. Without a route, `llm_config` comes first, then the inline fallbacks.

Per failure of an attempt:
- skipped (nothing was sent): the prompt does not fit the deployment's context window, the
  organization has no such BYOK provider, no key is configured, the endpoint is not allowed;
- fall back, cooling the deployment down: 5xx/529, connect errors, an unreadable answer
  (UPSTREAM_BAD_RESPONSE: not JSON, a broken SSE before the first event), a timeout of one attempt
  (the deployment's `timeout_seconds`, not the caller's deadline: for a unary call the whole
  attempt, for a stream the wait for its first event, see `first_event`), 401/403 on a server key
  (the key, or the deployment, is disabled until the routes file is reloaded);
- fall back, cooling the key down: 429 (a deployment with several keys tries the next one);
- fall back, no cooldown: the provider's context-length error (the next deployment may be
  bigger), a request alone over the deployment's tokens-per-minute limit (Groq's 413; the next
  may allow more), and the reasons the route lists in `fallback_on` (UPSTREAM_BAD_RESPONSE there
  also covers an answer over LLMGW_MAX_ANSWER_BYTES and one of only reasoning, which otherwise
  end the call, as TOOL_CALL_MISSING does: the answer's fault, not the deployment's);
- end the call: anything else (400, 401/403 on the caller's BYOK key, content filter, ...) and
  the caller's deadline passing.

A cooldown lasts max(Retry-After, the deployment's cooldown_seconds) and never shortens one
already running. While other candidates remain, an attempt is one upstream request (no retry
sleeps: the next deployment is the retry); the last candidate gets the full retry policy. When
every remaining candidate is cooling down (or over its limits), the call waits for the earliest
only if that leaves time before the deadline; else RESOURCE_EXHAUSTED with RetryInfo set to the
earliest recovery. No attempt starts with less than MIN_ATTEMPT_SECONDS of the deadline left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from llmgateway.v1 import chat_pb2

from server import metrics
from server.auth.actor import Actor
from server.config import Settings
from server.core.reasoning_only import REASONING_ONLY
from server.core.retry import Deadline, RetryableError
from server.core.validation import LOCAL_TYPES
from server.errors import (
    ContextWindowExceeded,
    DeadlineExceeded,
    EndpointNotAllowed,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    MissingApiKey,
    NotFound,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.routing.attempts import Attempt, AttemptResult
from server.routing.config import EMPTY, Deployment, Key, Route, RouteTable, load_routes
from server.routing.first_event import first_event
from server.routing.health import Health

if TYPE_CHECKING:
    from server.limits.limiter import Admission

log = logging.getLogger("llmgateway.routing")

ChatRequest = chat_pb2.CreateRequest
MIN_ATTEMPT_SECONDS = 0.01
# The end of the caller's deadline kept for the answer: a routed call's attempts stop this much
# before it, so the final status (with what was tried) reaches the caller before its own timer
# ends the call with a bare DEADLINE_EXCEEDED. At most a tenth of the deadline.
ANSWER_ROOM_SECONDS = 0.05
MAX_INLINE_FALLBACKS = 8
# Providers' context-length errors (OpenAI/vLLM/OpenRouter, Anthropic, Gemini, Groq, Mistral), for a
# 400 a provider module did not map to CONTEXT_WINDOW_EXCEEDED itself.
CONTEXT_LENGTH = re.compile(
    r"maximum context length|context[_ ]length|context window|prompt is too long|too many tokens"
    r"|exceeds the maximum number of tokens|input is too long|reduce the length of the messages"
    r"|exceed context limit|longer than the maximum model length",
    re.IGNORECASE,
)
_INF = math.inf


class CallHost(Protocol):
    """The gateway, as the router calls it: one direct call per attempt (`via` says how)."""

    async def create(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, via: Attempt | None = None
    ) -> chat_pb2.CreateResponse: ...

    def stream(
        self, request: ChatRequest, actor: Actor, deadline: Deadline, via: Attempt | None = None
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]: ...


@dataclass(slots=True)
class _Candidate:
    label: str  # "route/name", "llm_config", "fallbacks[i]"
    route: str  # the route of the deployment ("" for inline configs)
    deployment: Deployment | None
    inline: chat_pb2.LLMConfig | None
    unit: str = ""  # health unit of the deployment ("" for inline configs)
    keys: tuple[Key, ...] = ()

    @property
    def weight(self) -> float:
        return self.deployment.weight if self.deployment is not None else 1.0


def wants_routing(request: ChatRequest) -> bool:
    return bool(request.route) or len(request.fallbacks) > 0


class Router:
    """The loaded route table (swapped whole on reload) and the health every call shares."""

    def __init__(
        self,
        settings: Settings,
        table: RouteTable = EMPTY,
        *,
        environ: Mapping[str, str] | None = None,
        register_secrets: Callable[[tuple[str, ...]], None] | None = None,
        rand: Callable[[], float] = random.random,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.health = health or Health()
        self.rand = rand
        self._environ = environ
        self._register = register_secrets
        self._rotation: dict[str, int] = {}
        self._single = replace(settings.retry, max_attempts=1)
        # The candidates of each route of `self.table` (routes without BYOK deployments, whose
        # health units do not depend on the caller): built once, not on every call.
        self._compiled: tuple[RouteTable, dict[str, tuple[_Candidate, ...]]] = (table, {})
        self._register_table(table)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        register_secrets: Callable[[tuple[str, ...]], None] | None = None,
    ) -> Router:
        """The router of `LLMGW_ROUTES_FILE` (none set: no routes); RoutesFileError when unusable."""
        table = EMPTY
        if settings.routes_file:
            table = load_routes(settings.routes_file, settings=settings, environ=environ)
        return cls(settings, table, environ=environ, register_secrets=register_secrets)

    def _register_table(self, table: RouteTable) -> None:
        if self._register is None:
            return
        secrets = tuple(
            s for r in table.routes.values() for d in r.deployments for k in d.keys for s in k.target.secrets
        )
        if secrets:
            self._register(secrets)

    async def reload(self) -> bool:
        """Read the routes file again (SIGHUP). Calls in flight finish on the table they started
        with; a file that cannot be used is logged and the loaded table kept."""
        path = self.settings.routes_file
        if not path:
            log.info("SIGHUP: no routes file configured (LLMGW_ROUTES_FILE), nothing to reload")
            return False
        environ = self._environ if self._environ is not None else {}
        try:
            table = await asyncio.to_thread(load_routes, path, settings=self.settings, environ=environ)
        except ValueError as exc:  # RoutesFileError: names the line, never a key
            log.error("routes not reloaded, the routes loaded before stay in use: %s", exc)
            return False
        self._register_table(table)  # before any call can use the new keys
        self.table = table
        self.health.forget_disabled()
        log.info("routes reloaded from %s: %d route(s)", path, len(table.routes))
        return True

    def candidates(self, table: RouteTable, route: Route, organization_id: str) -> tuple[_Candidate, ...]:
        compiled_for, cache = self._compiled
        if compiled_for is table:
            found = cache.get(route.name)
            if found is not None:
                return found
        candidates = tuple(
            _Candidate(
                d.id, route.name, d, None, d.id + "@" + organization_id if d.mode == "byok" else d.id, d.keys
            )
            for d in route.deployments
        )
        if any(d.mode == "byok" for d in route.deployments):
            return candidates
        if compiled_for is not table:
            if table is not self.table:
                return candidates  # a call still on the table before a reload
            cache = {}
            self._compiled = (table, cache)
        cache[route.name] = candidates
        return candidates

    # -- the calls ------------------------------------------------------------------------------

    def _call(self, request: ChatRequest, actor: Actor, admission: Admission | None = None) -> _Call:
        return _Call(self, self.table, request, actor, admission)

    async def create(
        self,
        host: CallHost,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        admission: Admission | None = None,
    ) -> chat_pb2.CreateResponse:
        call = self._call(request, actor, admission)
        deadline = _answer_room(deadline)
        while True:
            attempt, candidate, attempt_deadline = await call.next_attempt(deadline)
            try:
                response = await host.create(request, actor, attempt_deadline, attempt)
            except GatewayError as error:
                call.failed(candidate, attempt, error, deadline)
                continue
            except BaseException as exc:
                attempt.finish(exc)
                raise
            attempt.finish(None)
            call.succeeded(candidate, response.completion.usage.total_tokens)
            call.answered(candidate, response.deployment)
            return response

    async def stream(
        self,
        host: CallHost,
        request: ChatRequest,
        actor: Actor,
        deadline: Deadline,
        admission: Admission | None = None,
    ) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        call = self._call(request, actor, admission)
        deadline = _answer_room(deadline)
        while True:
            attempt, candidate, attempt_deadline = await call.next_attempt(deadline, stream=True)
            events = host.stream(request, actor, attempt_deadline, attempt)
            try:
                first = await first_event(events, attempt)  # within timeout_seconds
            except GatewayError as error:
                await events.aclose()  # type: ignore[attr-defined]
                call.failed(candidate, attempt, error, deadline)
                continue
            except BaseException as exc:
                await events.aclose()  # type: ignore[attr-defined]
                attempt.finish(exc)
                raise
            break
        # The first event is on its way to the caller: from here nothing falls back.
        try:
            event = first
            while True:
                if event.HasField("completion"):
                    call.succeeded(candidate, event.completion.usage.total_tokens)
                    call.answered(candidate, event.deployment)
                yield event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def for_counting(self, request: ChatRequest, actor: Actor) -> None:
        """Set `request.llm_config` to the deployment Create is most likely to try first: the
        healthy deployment of the largest weight (file order breaks ties)."""
        call = self._call(request, actor)
        call.configure_for_counting()


@dataclass(slots=True)
class _Call:
    router: Router
    table: RouteTable
    request: ChatRequest
    actor: Actor
    admission: Admission | None = None  # the call's way through the limits, shared by its attempts
    tiers: list[Sequence[_Candidate]] = field(default_factory=list)
    results: list[AttemptResult] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    last_error: GatewayError | None = None
    windows_skipped: list[int] = field(default_factory=list)
    sent: int = 0  # attempts that reached the gateway's call path
    waits: int = 0
    key: Key | None = None  # the key of the attempt in progress
    skip_metadata: dict[str, str] = field(default_factory=dict)
    skipped: int = 0  # attempts that sent nothing (SKIPPED_*)
    moving_on: str = ""  # the reason the last attempt failed, counted once the next one starts

    def __post_init__(self) -> None:
        request = self.request
        if request.route:
            route = self.table.routes.get(request.route)
            if route is None or not route.allows(self.actor.organization_id):
                # The same answer for a route this organization may not use: its name leaks nothing.
                raise NotFound(
                    f"no route named {request.route[:128]!r}",
                    metadata={"route": request.route, "not_found": "route"},
                )
            self._add_route(route, set())
        else:
            self.tiers.append([_Candidate("llm_config", "", None, request.llm_config)])
        fallbacks = request.fallbacks
        if not fallbacks and request.route:
            return  # the routes file holds no local types
        if len(fallbacks) > MAX_INLINE_FALLBACKS:
            raise InvalidRequest(
                f"at most {MAX_INLINE_FALLBACKS} fallbacks per request",
                metadata={"fallbacks": len(fallbacks)},
                field_violations=[FieldViolation("fallbacks", f"at most {MAX_INLINE_FALLBACKS}")],
            )
        for i, config in enumerate(fallbacks):
            self.tiers.append([_Candidate(f"fallbacks[{i}]", "", None, config)])
        for tier in self.tiers:
            for c in tier:
                if (
                    c.deployment is None
                    and c.inline is not None
                    and c.inline.model_endpoint_type in LOCAL_TYPES
                ):
                    where = "llm_config" if c.label == "llm_config" else c.label
                    raise InvalidRequest(
                        f"{where}: local server types cannot be routed or fall back",
                        metadata={"field": where, "model_endpoint_type": c.inline.model_endpoint_type},
                        field_violations=[FieldViolation(f"{where}.model_endpoint_type", "not a local type")],
                    )

    def _add_route(self, route: Route, seen: set[str]) -> None:
        if route.name in seen:  # the file has no cycles; a route reached twice is tried once
            return
        seen.add(route.name)
        self.tiers.append(self.router.candidates(self.table, route, self.actor.organization_id))
        for name in route.fallbacks:
            fallback = self.table.routes.get(name)
            if fallback is not None:
                self._add_route(fallback, seen)

    # -- selection ------------------------------------------------------------------------------

    def _state(self, c: _Candidate, now: float, calm: bool = False) -> tuple[bool, Key | None, float]:
        """(usable now, the key to use, when it may be usable if not now: inf for never).

        `calm`: nothing cools down, nothing is disabled, nothing was tried (the first pick of a
        call, nearly always): only the per-minute limits can stand in the way."""
        if c.deployment is None:
            return (c.label not in self.tried, None, _INF)
        d = c.deployment
        if calm and not (d.requests_per_minute or d.tokens_per_minute):
            if c.keys:
                return (True, c.keys[self.router._rotation.get(c.unit, 0) % len(c.keys)], 0.0)
            return (True, None, 0.0)
        health = self.router.health
        if not c.keys and (c.unit in self.tried or health.disabled(c.unit)):
            return (False, None, _INF)
        until = health.cooling_until(c.unit, now)
        at = until if until > now else 0.0
        if d.requests_per_minute or d.tokens_per_minute:
            window = health.window(c.unit)
            requests, tokens = window.totals(now)
            if (d.requests_per_minute and requests >= d.requests_per_minute) or (
                d.tokens_per_minute and tokens >= d.tokens_per_minute
            ):
                at = max(at, window.frees_at(now))
        key = None
        if c.keys:
            key_at = _INF
            start = self.router._rotation.get(c.unit, 0)
            n = len(c.keys)
            for i in range(n):
                k = c.keys[(start + i) % n]
                unit = k.unit
                if unit in self.tried or health.disabled(unit):
                    continue
                k_until = health.cooling_until(unit, now)
                if k_until > now:
                    key_at = min(key_at, k_until)
                    continue
                key = k
                break
            if key is None:
                return (False, None, max(at, key_at))
        if at > now:
            return (False, key, at)
        return (True, key, 0.0)

    def _pick(self) -> tuple[_Candidate, Key | None, bool] | float | None:
        """The next candidate (and whether it is the last one usable now), the earliest time one
        recovers when none is usable, or None when every candidate was tried."""
        health = self.router.health
        now = health.clock()
        calm = not self.tried and health.calm()
        earliest = _INF
        for index, tier in enumerate(self.tiers):
            usable: list[tuple[_Candidate, Key | None]] = []
            for c in tier:
                ok, key, at = self._state(c, now, calm)
                if ok:
                    usable.append((c, key))
                elif at < earliest:
                    earliest = at
            if not usable:
                continue
            if len(usable) == 1:
                c, key = usable[0]
                last = not self._more_after(c, key, index, now)
                return c, key, last
            total = 0.0
            for c, _ in usable:
                total += c.weight
            r = self.router.rand() * total
            for c, key in usable:
                r -= c.weight
                if r < 0:
                    return c, key, False
            c, key = usable[-1]  # float rounding left r at 0
            return c, key, False
        return earliest if earliest < _INF else None

    def _more_after(self, chosen: _Candidate, key: Key | None, index: int, now: float) -> bool:
        if chosen.keys and key is not None:
            for k in chosen.keys:
                if k is not key and k.unit not in self.tried and not self.router.health.disabled(k.unit):
                    return True
        for tier in self.tiers[index + 1 :]:
            for c in tier:
                if self._state(c, now)[0]:
                    return True
        return False

    # -- attempts -------------------------------------------------------------------------------

    async def next_attempt(
        self, deadline: Deadline, *, stream: bool = False
    ) -> tuple[Attempt, _Candidate, Deadline]:
        while True:
            picked = self._pick()
            if picked is None:
                raise self._final_error(deadline)
            if isinstance(picked, float):
                await self._wait_or_fail(picked, deadline)
                continue
            candidate, key, last = picked
            return self._begin(candidate, key, last, deadline, stream)

    async def _wait_or_fail(self, recovers: float, deadline: Deadline) -> None:
        health = self.router.health
        wait = max(0.0, recovers - health.clock())
        remaining = deadline.remaining()
        settings = self.router.settings.retry
        fits = wait <= settings.max_delay if remaining is None else wait + MIN_ATTEMPT_SECONDS < remaining
        if not fits or self.waits >= settings.max_attempts:
            error = RateLimitExceeded(
                f"every deployment left to try is cooling down or over its limits; the earliest recovers "
                f"in {wait:.3f} s"
                + (
                    ""
                    if remaining is None
                    else f", after the caller's deadline ({max(0.0, remaining):.3f} s left)"
                ),
                metadata={"retry_delay_seconds": f"{wait:.3f}", "cooling_down": "true"},
                retry_delay=wait,
            )
            raise self._annotated(error)
        self.waits += 1
        log.info("routing: every candidate is cooling down; waiting %.3f s for the earliest", wait)
        await asyncio.sleep(wait)

    def _begin(
        self, c: _Candidate, key: Key | None, last: bool, deadline: Deadline, stream: bool
    ) -> tuple[Attempt, _Candidate, Deadline]:
        remaining = deadline.remaining()
        if remaining is not None and remaining < MIN_ATTEMPT_SECONDS:
            raise self._annotated(
                DeadlineExceeded(
                    f"the caller's deadline leaves no time to try {c.label}",
                    metadata={"remaining_seconds": f"{max(0.0, remaining):.3f}"},
                )
            )
        config = self.request.llm_config
        d = c.deployment
        target = None
        if d is None:
            assert c.inline is not None
            if c.inline is not config:  # llm_config itself is tried first, as it came
                config.CopyFrom(c.inline)
            self.tried.add(c.label)
        else:
            # The caller's generation parameters stay; the deployment's model, endpoint and window
            # replace whatever the request said (route deployments come before inline configs).
            dc = d.config
            config.model = dc.model
            config.model_endpoint_type = dc.model_endpoint_type
            config.model_endpoint = dc.model_endpoint
            config.context_window = dc.context_window
            config.provider_name = dc.provider_name
            config.provider_category = dc.provider_category
            config.handle = ""
            if key is not None:
                target = key.target
                self.tried.add(key.unit)
                # Round robin: the next call starts after the key used (not after the one this
                # call started at, which would hand a key next to a cooling one every other turn).
                self.router._rotation[c.unit] = (c.keys.index(key) + 1) % len(c.keys)
            else:
                target = d.keyless_target
                self.tried.add(c.unit)
            if d.requests_per_minute or d.tokens_per_minute:
                self.router.health.window(c.unit).add(self.router.health.clock(), requests=1)
        retry = self.router.settings.retry if last else self.router._single
        if self.moving_on:  # a fallback actually happens (not when nothing is left to try)
            metrics.record_fallback(self.moving_on)
            self.moving_on = ""
        self.sent += 1
        attempt = Attempt(c.route, c.label, target, retry, self.results, admission=self.admission)
        self.key = key
        attempt_deadline = deadline
        if d is not None and d.timeout is not None:
            ends = time.monotonic() + d.timeout
            if deadline.at is None or ends < deadline.at:
                attempt.timeout, attempt.stream = d.timeout, stream
                if stream:
                    # Only until the first event (a fallback is possible until then); the stream
                    # itself runs to the caller's deadline, never cut once it flows.
                    attempt.timeout_at = ends
                else:
                    attempt_deadline = Deadline(ends)  # a unary answer arrives as one piece
        return attempt, c, attempt_deadline

    def succeeded(self, c: _Candidate, total_tokens: int) -> None:
        d = c.deployment
        if d is not None and d.tokens_per_minute and total_tokens:
            self.router.health.window(c.unit).add(self.router.health.clock(), tokens=total_tokens)

    def answered(self, c: _Candidate, into: chat_pb2.RouteDeployment) -> None:
        config = self.request.llm_config
        into.route = self.request.route
        into.name = c.deployment.name if c.deployment is not None else c.label
        into.model_endpoint_type = config.model_endpoint_type
        into.model = config.model
        # The answering attempt of a stream is recorded only once its trace closes, after this.
        into.attempts = self.sent - self.skipped

    def failed(self, c: _Candidate, attempt: Attempt, error: GatewayError, deadline: Deadline) -> None:
        """Decide after a failed attempt: return to try the next candidate, or raise."""
        self._decide(c, attempt, error, deadline)
        self.moving_on = error.reason  # returned: the next candidate, if any, is a fallback

    def _decide(self, c: _Candidate, attempt: Attempt, error: GatewayError, deadline: Deadline) -> None:
        key = self.key
        d = c.deployment
        health = self.router.health
        remaining = deadline.remaining()
        caller_deadline_passed = remaining is not None and remaining <= 0
        # Nothing was sent: the next candidate may take it.
        if isinstance(error, ContextWindowExceeded) and not attempt.recorded:
            attempt.finish_as("SKIPPED_CONTEXT_WINDOW")
            self.skipped += 1
            self.windows_skipped.append(self.request.llm_config.context_window)
            self._remember_skip(error)
            return
        if isinstance(error, MissingApiKey | EndpointNotAllowed) or (
            isinstance(error, NotFound) and not attempt.recorded and error.metadata.get("provider_name")
        ):
            attempt.finish_as("SKIPPED_" + error.reason)
            self.skipped += 1
            self.last_error = self.last_error or error
            return
        attempt.finish(error)
        self.last_error = error
        if isinstance(error, DeadlineExceeded):
            if caller_deadline_passed or d is None or not attempt.own_timeout(error):
                raise self._annotated(error)
            # The deployment's own timeout, not the caller's deadline: another may be quicker.
            own = attempt.timeout_error()
            self.last_error = UpstreamUnavailable(own.message, metadata=own.metadata)
            health.cool(c.unit, d.cooldown)
            return
        if caller_deadline_passed:
            raise self._annotated(error)
        if isinstance(error, RateLimitExceeded):
            if "limit_tokens_per_minute" in error.metadata:
                # This request alone is over the deployment's per-minute token limit (Groq's 413):
                # the next deployment may have a higher one; this one and its key are fine for
                # smaller requests, so nothing cools down.
                return
            if d is not None:
                health.cool(key.unit if key is not None else c.unit, max(_retry_after(error), d.cooldown))
            return
        if isinstance(error, UpstreamUnavailable):
            if d is not None:
                health.cool(c.unit, max(_retry_after(error), d.cooldown))
            return
        if isinstance(error, UpstreamBadResponse) and not _the_answers_own(error):
            # The deployment answered something unreadable (not JSON, a broken SSE before the
            # first event, an HTML page): it is broken, another may answer. An answer over
            # LLMGW_MAX_ANSWER_BYTES (`limit_bytes`) is the request's, not the deployment's, and
            # an answer of only reasoning is the model's output (as TOOL_CALL_MISSING): neither
            # cools down; they fall back only where the route lists UPSTREAM_BAD_RESPONSE.
            if d is not None:
                health.cool(c.unit, d.cooldown)
            return
        # The provider's own context-length error (mapped to CONTEXT_WINDOW_EXCEEDED by the provider
        # modules, or a 400 whose text says so): the prompt, not the deployment; a bigger one may take it.
        if isinstance(error, ContextWindowExceeded) or (
            isinstance(error, UpstreamRejected) and CONTEXT_LENGTH.search(error.message)
        ):
            return
        if isinstance(error, UpstreamAuthFailed) and d is not None and d.mode != "byok":
            # A server key was refused: out of use until the routes file is reloaded.
            if key is not None:
                health.disable(key.unit)
                log.warning(
                    "routing: %s refused the key in %s (%s); that key is disabled until the routes file "
                    "is reloaded",
                    c.label,
                    key.variable,
                    error.metadata.get("http_status", "auth"),
                )
            else:
                health.disable(c.unit)
                log.warning(
                    "routing: %s refused the server's key (%s); the deployment is disabled until the "
                    "routes file is reloaded",
                    c.label,
                    error.metadata.get("http_status", "auth"),
                )
            return
        route = self.table.routes.get(c.route) if c.route else None
        if route is not None and error.reason in route.fallback_on:
            return
        raise self._annotated(error)

    def _remember_skip(self, error: ContextWindowExceeded) -> None:
        self.skip_metadata = dict(error.metadata)

    def _final_error(self, deadline: Deadline) -> GatewayError:
        error = self.last_error
        if error is None and self.windows_skipped:
            meta = dict(self.skip_metadata)
            windows = ", ".join(str(w) for w in self.windows_skipped)
            total = meta.get("total_tokens", "?")
            meta.pop("context_window", None)
            meta["context_windows"] = windows
            return self._annotated(
                ContextWindowExceeded(
                    f"Request exceeds maximum context length ({total} tokens) of every deployment tried "
                    f"(context windows {windows})",
                    metadata=meta,
                )
            )
        if error is None:
            error = UpstreamUnavailable("no deployment could be tried", metadata={})
        return self._annotated(error)

    def _annotated(self, error: GatewayError) -> GatewayError:
        """The error the caller gets, saying what was tried (ErrorInfo metadata)."""
        tried = [f"{r.deployment} ({r.status})" for r in self.results]
        meta = error.metadata
        if self.request.route:
            meta["route"] = self.request.route
        meta["attempts"] = str(self.sent)
        meta["deployments"] = ",".join(r.deployment for r in self.results)
        if self.last_error is not None:
            meta["last_error"] = self.last_error.reason
        if self.windows_skipped:
            meta["context_windows_skipped"] = ",".join(str(w) for w in self.windows_skipped)
        if tried:
            error.message = f"{error.message} (tried {', '.join(tried)})"
            error.args = (error.message,)
        return error

    def configure_for_counting(self) -> None:
        for tier in self.tiers:
            now = self.router.health.clock()
            best: _Candidate | None = None
            for c in tier:
                if self._state(c, now)[0] and (best is None or c.weight > best.weight):
                    best = c
            if best is None and tier:
                best = max(tier, key=lambda c: c.weight)  # all cooling: counted for the likeliest anyway
            if best is not None:
                if best.deployment is None:
                    assert best.inline is not None
                    if best.inline is not self.request.llm_config:
                        self.request.llm_config.CopyFrom(best.inline)
                else:
                    config = self.request.llm_config
                    dc = best.deployment.config
                    config.model = dc.model
                    config.model_endpoint_type = dc.model_endpoint_type
                    config.model_endpoint = dc.model_endpoint
                    config.context_window = dc.context_window
                    config.provider_name = dc.provider_name
                    config.provider_category = dc.provider_category
                return


def _answer_room(deadline: Deadline) -> Deadline:
    """The deadline a routed call's attempts share: the caller's, less ANSWER_ROOM_SECONDS."""
    remaining = deadline.remaining()
    if deadline.at is None or remaining is None:
        return deadline
    return Deadline(deadline.at - min(ANSWER_ROOM_SECONDS, max(0.0, remaining) / 10))


def _the_answers_own(error: UpstreamBadResponse) -> bool:
    """An UPSTREAM_BAD_RESPONSE about what this answer said, not about the deployment's health."""
    return "limit_bytes" in error.metadata or error.metadata.get("cause") == REASONING_ONLY


def _retry_after(error: GatewayError) -> float:
    """The upstream's own Retry-After of a failed attempt (0 when it sent none)."""
    cause = error.__cause__
    if isinstance(cause, RetryableError) and cause.retry_after is not None:
        return cause.retry_after
    return 0.0
