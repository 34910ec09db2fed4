"""Retry policy for upstream calls: exponential backoff with jitter, bounded by the deadline.

The seed's retry never fired (a failed response object is falsy, so it re-raised). Ours retries
HTTP 429 always, 5xx and connection errors by default, honours `Retry-After` (seconds or HTTP
date) and `retry-after-ms`, and never sleeps past the caller's deadline.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from server.config import RetrySettings
from server.errors import GatewayError, RateLimitExceeded, UpstreamUnavailable

log = logging.getLogger("llmgateway.retry")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute point on the event loop's clock (None: no deadline)."""

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


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def is_retryable_status(settings: RetrySettings, status: int) -> bool:
    if status == 0:
        return settings.retry_connection_errors
    return status == 429 or status in settings.retry_statuses


def backoff_delay(settings: RetrySettings, retry_number: int, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry `retry_number` (1-based): initial * multiplier**(n-1) * (1 + jitter*rand)."""
    base = settings.initial_delay * settings.multiplier ** (retry_number - 1)
    return min(settings.max_delay, base * (1.0 + settings.jitter * rand()))


def _give_up_error(last: RetryableError, delay: float | None, reason: str, attempts: int) -> GatewayError:
    error = last.error
    metadata = dict(error.metadata)
    metadata.update({"attempts": str(attempts), "give_up": reason})
    if isinstance(error, RateLimitExceeded):
        cls: type[GatewayError] = RateLimitExceeded
    elif isinstance(error, UpstreamUnavailable):
        cls = UpstreamUnavailable
    else:
        cls = type(error)
    return cls(error.message, metadata=metadata, retry_delay=delay if delay is not None else error.retry_delay)


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    settings: RetrySettings,
    deadline: Deadline,
    on_retry: Callable[[int, float, int], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds, fails for good, or the budget or deadline runs out.

    `on_retry(attempt_number, delay, status)` is called before each sleep.
    """
    attempt_number = 0
    while True:
        attempt_number += 1
        try:
            return await attempt()
        except RetryableError as failure:
            if not is_retryable_status(settings, failure.status):
                log.warning(
                    "llm_non_retryable_error status=%s reason=%s", failure.status, failure.error.reason
                )
                raise failure.error from failure
            # The upstream's own hint wins over our backoff; a hint beyond max_delay is not worth
            # holding the caller for, so it is handed back in RetryInfo instead.
            delay = failure.retry_after if failure.retry_after is not None else backoff_delay(
                settings, attempt_number
            )
            if delay > settings.max_delay:
                log.warning("llm_max_retries_exceeded attempt=%d retry_after=%.3f: beyond max_delay",
                            attempt_number, delay)
                raise _give_up_error(failure, delay, "retry_after_too_long", attempt_number) from failure
            if attempt_number >= settings.max_attempts:
                log.warning(
                    "llm_max_retries_exceeded max_attempts=%d status=%s", settings.max_attempts, failure.status
                )
                raise _give_up_error(failure, delay, "max_attempts", attempt_number) from failure
            remaining = deadline.remaining()
            if remaining is not None and delay >= remaining:
                log.warning(
                    "llm_max_retries_exceeded attempt=%d delay=%.3f status=%s: the deadline comes first",
                    attempt_number,
                    delay,
                    failure.status,
                )
                raise _give_up_error(failure, delay, "deadline", attempt_number) from failure
            log.warning("llm_retry_attempt attempt=%d delay=%.3f status=%s", attempt_number, delay, failure.status)
            if on_retry is not None:
                on_retry(attempt_number, delay, failure.status)
            await asyncio.sleep(delay)
