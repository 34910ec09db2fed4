"""Retry policy for upstream calls: exponential backoff with jitter, bounded by the deadline.

The seed's retry never fired (a failed response object is falsy, so it re-raised). Ours retries
HTTP 429 always, 5xx and connection errors by default, honours `Retry-After` (seconds or HTTP
date) and `retry-after-ms`, and never sleeps past the caller's deadline.

The frozen policy (`server.config.RetrySettings`, defaults in brackets):

    delay before retry n (1-based) = min(max_delay [20 s],
                                         initial_delay [1 s] * multiplier [2] ** (n - 1)
                                         * (1 + jitter [1.0] * random()))
    at most max_attempts [6] attempts in all (so 5 retries)
    retried: 429 always; retry_statuses [500, 502, 503, 504]; connection errors
             [retry_connection_errors = True]

An upstream hint (`retry-after-ms`, else `Retry-After`) replaces the computed delay. A hint
longer than `max_delay`, a delay that would cross the caller's deadline, or an exhausted budget
ends the call at once with the last error (RESOURCE_EXHAUSTED/RATE_LIMIT_EXCEEDED for 429,
UNAVAILABLE/UPSTREAM_UNAVAILABLE otherwise) carrying `RetryInfo` with the delay we would have
waited.

Every outcome other than a first-time success is one log line and one event on the current
OpenTelemetry span, named as the seed named them: `llm_retry_attempt` (before each sleep),
`llm_max_retries_exceeded` (giving up), `llm_non_retryable_error` (a failure no retry can fix)
and `llm_unexpected_error` (a bug), each with the attempt number, the delay and the HTTP status
(0 for a connection error).
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import TypeVar

from server import metrics
from server.config import RetrySettings
from server.errors import GatewayError, RateLimitExceeded, UpstreamUnavailable

log = logging.getLogger("llmgateway.retry")
T = TypeVar("T")

# A hint beyond this is nonsense (or hostile); it is clamped so RetryInfo stays representable.
MAX_RETRY_AFTER = 24 * 3600.0

EVENT_RETRY = "llm_retry_attempt"
EVENT_GIVE_UP = "llm_max_retries_exceeded"
EVENT_NON_RETRYABLE = "llm_non_retryable_error"
EVENT_UNEXPECTED = "llm_unexpected_error"


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute point on the monotonic clock (None: no deadline)."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()


class RetryableError(Exception):
    """Raised by one attempt when the upstream failed in a way a retry may fix.

    `error` is what the caller gets if no retry is left; `status` is the HTTP status (0 for a
    connection error); `retry_after` is the upstream's own hint in seconds.
    """

    def __init__(self, error: GatewayError, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.retry_after = retry_after


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():  # a plain dict is not case-insensitive
        if key.lower() == name:
            return candidate
    return None


def _seconds(value: float) -> float | None:
    if math.isnan(value):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, value))


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    millis = _header(headers, "retry-after-ms")
    if millis:
        try:
            parsed = _seconds(float(millis.strip()) / 1000.0)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed
    value = _header(headers, "retry-after")
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        return _seconds(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return _seconds(when.timestamp() - time.time())


def is_retryable_status(settings: RetrySettings, status: int) -> bool:
    if status == 0:
        return settings.retry_connection_errors
    return status == 429 or status in settings.retry_statuses


def backoff_delay(
    settings: RetrySettings, retry_number: int, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry `retry_number` (1-based): initial * multiplier**(n-1) * (1 + jitter*rand)."""
    exponent = min(max(0, retry_number - 1), 64)  # beyond that the cap has long been reached
    try:
        base = settings.initial_delay * settings.multiplier**exponent
    except OverflowError:
        base = settings.max_delay
    return max(0.0, min(settings.max_delay, base * (1.0 + settings.jitter * rand())))


def _emit(
    event: str, level: int, *, attempt: int, delay: float | None, status: int, reason: str, **extra: object
) -> None:
    """One log line and one span event for a retry decision."""
    fields: dict[str, object] = {
        "attempt": attempt,
        "delay": round(delay, 3) if delay is not None else -1.0,
        "status_code": status,
        "reason": reason,
        **extra,
    }
    log.log(
        level,
        "%s %s",
        event,
        " ".join(f"{k}={v}" for k, v in fields.items()),
        extra={"event": event, **{f"llm_{k}": v for k, v in fields.items()}},
    )
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - a dependency, but telemetry must never break a call
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            event, {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in fields.items()}
        )


def _status_of(error: GatewayError) -> int:
    try:
        return int(error.metadata.get("http_status", "0"))
    except ValueError:
        return 0


def _give_up_error(
    last: RetryableError, delay: float | None, reason: str, attempts: int, settings: RetrySettings
) -> GatewayError:
    error = last.error
    metadata: dict[str, object] = dict(error.metadata)
    metadata.update({"attempts": attempts, "max_attempts": settings.max_attempts, "give_up": reason})
    cls: type[GatewayError]
    if isinstance(error, RateLimitExceeded):
        cls = RateLimitExceeded
    elif isinstance(error, UpstreamUnavailable):
        cls = UpstreamUnavailable
    else:
        cls = type(error)
    retry_delay = delay if delay is not None else error.retry_delay
    if retry_delay is not None:
        retry_delay = min(MAX_RETRY_AFTER, max(0.0, retry_delay))
        metadata["retry_delay_seconds"] = f"{retry_delay:.3f}"
    given_up = cls(error.message, metadata=metadata, retry_delay=retry_delay)
    given_up.trace_body = error.trace_body  # the last answer's body, for the trace (4xx and 5xx alike)
    return given_up


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    settings: RetrySettings,
    deadline: Deadline,
    on_retry: Callable[[int, float, int], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds, fails for good, or the budget or deadline runs out.

    `attempt` raises `RetryableError` for a failure a retry may fix and a `GatewayError` for one
    it cannot. `on_retry(attempt_number, delay, status)` is called before each sleep (the log
    line and span event are emitted here whether or not it is given).
    """
    max_attempts = max(1, settings.max_attempts)
    attempt_number = 0
    while True:
        attempt_number += 1
        try:
            return await attempt()
        except RetryableError as failure:
            status = failure.status
            if not is_retryable_status(settings, status):
                _emit(
                    EVENT_NON_RETRYABLE,
                    logging.WARNING,
                    attempt=attempt_number,
                    delay=None,
                    status=status,
                    reason=failure.error.reason,
                )
                # A copy: the failure stays the cause (router._retry_after reads its Retry-After)
                # but its `.error` is not the error raised, which would point back to it, a cycle
                # (error -> cause -> error, with the traceback's frames) that only the collector frees.
                raise copy.copy(failure.error) from failure
            # The upstream's own hint wins over our backoff; a hint beyond max_delay is not worth
            # holding the caller for, so it is handed back in RetryInfo instead.
            hinted = failure.retry_after is not None
            delay = (
                failure.retry_after
                if failure.retry_after is not None
                else backoff_delay(settings, attempt_number)
            )
            give_up: str | None = None
            if hinted and delay > settings.max_delay:
                give_up = "retry_after_too_long"
            elif attempt_number >= max_attempts:
                give_up = "max_attempts"
            else:
                remaining = deadline.remaining()
                if remaining is not None and delay >= remaining:
                    give_up = "deadline"
            if give_up is not None:
                _emit(
                    EVENT_GIVE_UP,
                    logging.WARNING,
                    attempt=attempt_number,
                    delay=delay,
                    status=status,
                    reason=failure.error.reason,
                    give_up=give_up,
                    max_attempts=max_attempts,
                )
                raise _give_up_error(failure, delay, give_up, attempt_number, settings) from failure
            _emit(
                EVENT_RETRY,
                logging.WARNING,
                attempt=attempt_number,
                delay=delay,
                status=status,
                reason=failure.error.reason,
                hinted=hinted,
            )
            metrics.record_retry(failure.error.reason)
            if on_retry is not None:
                on_retry(attempt_number, delay, status)
            await asyncio.sleep(delay)
        except GatewayError as error:
            _emit(
                EVENT_NON_RETRYABLE,
                logging.WARNING,
                attempt=attempt_number,
                delay=None,
                status=_status_of(error),
                reason=error.reason,
            )
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            _emit(
                EVENT_UNEXPECTED,
                logging.ERROR,
                attempt=attempt_number,
                delay=None,
                status=0,
                reason=type(exc).__name__,
            )
            raise
