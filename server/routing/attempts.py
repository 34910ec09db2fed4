"""What a routed call records: one `Attempt` handed to the gateway per upstream attempt, the
list of attempts on the trace (`attempts_json`), and the answering deployment on the response."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from llmgateway.v1 import traces_pb2

from server.config import RetrySettings
from server.errors import DeadlineExceeded, GatewayError
from server.providers.base import UpstreamTarget
from server.traces.base import TraceRecord

if TYPE_CHECKING:
    from server.limits.limiter import Admission

MAX_RECORDED = 32  # attempts kept on a trace; a call makes few, this bounds a pathological one
OK = "OK"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    route: str
    deployment: str
    status: str  # "OK", an ErrorInfo reason, or SKIPPED_* when nothing was sent
    latency_ms: float


@dataclass(slots=True)
class Attempt:
    """One try of one deployment, as the gateway sees it (`via`): where to send it, with which
    retry policy, and the call's attempt list its trace records."""

    route: str  # the route the request named ("" for llm_config / inline fallbacks)
    deployment: str  # "route/name", "llm_config" or "fallbacks[i]"
    target: UpstreamTarget | None  # prebuilt (file keys, keyless); None: resolved as a direct call
    retry: RetrySettings
    results: list[AttemptResult]
    started: float = field(default_factory=time.perf_counter)
    recorded: bool = False
    # The routed call's way through the limits (server.limits): admitted by its first attempt
    # that gets as far as counting the prompt, settled once by the call.
    admission: Admission | None = None
    # The deployment's timeout_seconds, when it ends before the caller's deadline: a unary
    # attempt's deadline; for a stream only the wait for its first event (a timer,
    # `server.routing.first_event`), the stream itself then runs to the caller's deadline.
    timeout: float | None = None
    stream: bool = False
    timeout_at: float | None = None  # time.monotonic() at which a stream's first event is overdue
    # Set by that timer just before it cancels the attempt: the cancellation is this timeout.
    timed_out: DeadlineExceeded | None = None

    def timeout_error(self) -> DeadlineExceeded:
        """The deployment's own timeout, said as such (it is not the caller's deadline)."""
        assert self.timeout is not None
        what = "sent no event" if self.stream else "did not answer"
        return DeadlineExceeded(
            f"{self.deployment} {what} within its timeout_seconds ({self.timeout:g} s)",
            metadata={"deployment": self.deployment, "timeout_seconds": f"{self.timeout:g}"},
        )

    def own_timeout(self, error: GatewayError) -> bool:
        """Whether `error` is this deployment's timeout_seconds running out."""
        if self.stream:
            return error is self.timed_out
        return self.timeout is not None and isinstance(error, DeadlineExceeded)

    def outcome(self, error: BaseException | None) -> BaseException | None:
        """`error` as this attempt's trace records it: its own timeout as that timeout."""
        if self.timed_out is not None and isinstance(error, asyncio.CancelledError):
            return self.timed_out  # not the caller's cancellation: the first event was overdue
        if isinstance(error, DeadlineExceeded) and not self.stream and self.own_timeout(error):
            # The upstream call's deadline was this deployment's, not the caller's: say so.
            own = self.timeout_error()
            error.message = own.message
            error.args = (own.message,)
            error.metadata.update(own.metadata)
        return error

    def finish(self, error: BaseException | None) -> None:
        """Append this attempt's result to the call's list (once)."""
        if self.recorded:
            return
        if error is None:
            status = OK
        elif isinstance(error, GatewayError):
            status = error.reason
        else:
            status = type(error).__name__
        self.finish_as(status)

    def finish_as(self, status: str) -> None:
        if self.recorded:
            return
        self.recorded = True
        if len(self.results) < MAX_RECORDED:
            latency = (time.perf_counter() - self.started) * 1000.0
            self.results.append(AttemptResult(self.route, self.deployment, status, latency))

    def annotate(self, record: TraceRecord, error: BaseException | None) -> BaseException | None:
        """The trace of this attempt: route, deployment and every attempt so far (this one last);
        returns the error to record (`outcome`)."""
        error = self.outcome(error)
        self.finish(error)
        record.route = self.route
        record.deployment = self.deployment
        record.attempts_json = attempts_json(self.results)
        return error


def attempts_json(results: list[AttemptResult]) -> str:
    return orjson.dumps(
        [
            {
                "route": r.route,
                "deployment": r.deployment,
                "status": r.status,
                "latency_ms": r.latency_ms,
            }
            for r in results
        ]
    ).decode()


def route_attempts(text: str) -> list[traces_pb2.RouteAttempt]:
    """The trace's attempts as protos (a row written before routes, or unreadable: none)."""
    if not text:
        return []
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    out = []
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            latency = item.get("latency_ms")
            out.append(
                traces_pb2.RouteAttempt(
                    route=str(item.get("route", "")),
                    deployment=str(item.get("deployment", "")),
                    status=str(item.get("status", "")),
                    latency_ms=float(latency) if isinstance(latency, int | float) else 0.0,
                )
            )
    return out
