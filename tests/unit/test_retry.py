"""The retry policy on its own: delays, hints, budget, deadline, and what it logs and records."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.config import RetrySettings
from server.core.retry import (
    MAX_RETRY_AFTER,
    Deadline,
    RetryableError,
    backoff_delay,
    call_with_retries,
    is_retryable_status,
    parse_retry_after,
)
from server.errors import RateLimitExceeded, UpstreamRejected, UpstreamUnavailable

FAST = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=0.05, max_attempts=4)
NO_DEADLINE = Deadline.after(None)


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": " 2 "}, 2.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "250", "Retry-After": "9"}, 0.25),  # ms wins
        ({"retry-after-ms": "junk", "Retry-After": "9"}, 9.0),  # a bad ms hint falls back
        ({"Retry-After": "-5"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, MAX_RETRY_AFTER),
        ({"Retry-After": "1e300"}, MAX_RETRY_AFTER),
        ({"retry-after-ms": "nan"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    delay = parse_retry_after({"Retry-After": when})
    assert delay is not None and 28 <= delay <= 31


@given(st.dictionaries(st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "x"]), st.text()))
def test_parse_retry_after_never_raises(headers: dict[str, str]) -> None:
    delay = parse_retry_after(headers)
    assert delay is None or 0.0 <= delay <= MAX_RETRY_AFTER


# -- backoff ---------------------------------------------------------------------------------


def test_default_policy_is_the_documented_one() -> None:
    policy = RetrySettings()
    assert (
        policy.initial_delay,
        policy.multiplier,
        policy.jitter,
        policy.max_delay,
        policy.max_attempts,
    ) == (
        1.0,
        2.0,
        1.0,
        20.0,
        6,
    )
    assert policy.retry_statuses == (429, 500, 502, 503, 504)
    assert policy.retry_connection_errors


def test_backoff_is_exponential_with_bounded_jitter() -> None:
    policy = RetrySettings(initial_delay=1.0, multiplier=2.0, jitter=1.0, max_delay=20.0)
    assert [backoff_delay(policy, n, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 16, 20]
    assert [backoff_delay(policy, n, rand=lambda: 0.999) for n in (1, 2, 3)] == pytest.approx(
        [1.999, 3.998, 7.996]
    )
    assert backoff_delay(policy, 10_000) == 20.0  # no overflow


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_stays_within_its_bounds(n: int, r: float) -> None:
    policy = RetrySettings()
    delay = backoff_delay(policy, n, rand=lambda: r)
    base = min(policy.max_delay, policy.initial_delay * policy.multiplier ** min(n - 1, 64))
    assert base <= delay or delay == policy.max_delay
    assert 0 < delay <= policy.max_delay


def test_retryable_statuses() -> None:
    policy = RetrySettings(retry_statuses=(503,), retry_connection_errors=False)
    assert is_retryable_status(policy, 429)  # always
    assert is_retryable_status(policy, 503)
    assert not is_retryable_status(policy, 500)
    assert not is_retryable_status(policy, 0)
    assert is_retryable_status(RetrySettings(), 0)


# -- the loop --------------------------------------------------------------------------------


class Script:
    """An attempt that fails as scripted, then succeeds."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def rate_limited(retry_after: float | None = None) -> RetryableError:
    error = RateLimitExceeded(
        "openai answered HTTP 429: slow down",
        metadata={"http_status": 429},
        retry_delay=retry_after if retry_after is not None else 1.0,
    )
    return RetryableError(error, status=429, retry_after=retry_after)


def unavailable(status: int = 503) -> RetryableError:
    return RetryableError(
        UpstreamUnavailable(f"HTTP {status}", metadata={"http_status": status}), status=status
    )


async def test_retries_until_success_and_reports_each_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[int, float, int]] = []
    attempt = Script(rate_limited(), unavailable(502))
    with caplog.at_level(logging.WARNING, logger="llmgateway.retry"):
        result = await call_with_retries(
            attempt, settings=FAST, deadline=NO_DEADLINE, on_retry=lambda *a: seen.append(a)
        )
    assert result == "ok" and attempt.calls == 3
    assert seen == [(1, 0.01, 429), (2, 0.02, 502)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("llm_retry_attempt attempt=1 delay=0.01 status_code=429")
    assert lines[1].startswith("llm_retry_attempt attempt=2 delay=0.02 status_code=502")
    assert caplog.records[0].llm_attempt == 1  # type: ignore[attr-defined]  # structured, too


async def test_gives_up_after_the_budget_with_retry_info(caplog: pytest.LogCaptureFixture) -> None:
    attempt = Script(*[rate_limited() for _ in range(10)])
    with (
        caplog.at_level(logging.WARNING, logger="llmgateway.retry"),
        pytest.raises(RateLimitExceeded) as info,
    ):
        await call_with_retries(attempt, settings=FAST, deadline=NO_DEADLINE)
    assert attempt.calls == 4
    error = info.value
    assert error.metadata["attempts"] == "4" and error.metadata["give_up"] == "max_attempts"
    assert error.metadata["http_status"] == "429"
    assert error.retry_delay == pytest.approx(0.05)  # the delay we would have waited next (capped)
    assert "openai answered HTTP 429: slow down" == error.message
    names = [r.getMessage().split()[0] for r in caplog.records]
    assert names == ["llm_retry_attempt"] * 3 + ["llm_max_retries_exceeded"]


async def test_the_upstream_hint_replaces_the_backoff() -> None:
    seen: list[tuple[int, float, int]] = []
    attempt = Script(rate_limited(retry_after=0.04))
    started = time.monotonic()
    await call_with_retries(attempt, settings=FAST, deadline=NO_DEADLINE, on_retry=lambda *a: seen.append(a))
    assert seen == [(1, 0.04, 429)]
    assert time.monotonic() - started >= 0.035


async def test_a_hint_beyond_max_delay_is_handed_back_at_once() -> None:
    attempt = Script(rate_limited(retry_after=30.0))
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        await call_with_retries(attempt, settings=FAST, deadline=NO_DEADLINE)
    assert time.monotonic() - started < 1.0
    assert info.value.retry_delay == 30.0 and info.value.metadata["give_up"] == "retry_after_too_long"
    assert attempt.calls == 1


async def test_never_sleeps_past_the_deadline() -> None:
    policy = RetrySettings(initial_delay=0.1, multiplier=10.0, jitter=0.0, max_delay=10.0, max_attempts=10)
    attempt = Script(*[unavailable() for _ in range(10)])
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as info:
        await call_with_retries(attempt, settings=policy, deadline=Deadline.after(3.0))
    elapsed = time.monotonic() - started
    # Sleeps of 0.1 s and 1 s fit in the 3 s; the next (10 s) would cross it: stop at once.
    assert attempt.calls == 3
    assert info.value.metadata["give_up"] == "deadline"
    assert info.value.retry_delay == pytest.approx(10.0)
    assert 1.05 <= elapsed < 3.0


async def test_a_hint_past_the_deadline_stops_at_once() -> None:
    attempt = Script(rate_limited(retry_after=0.5))
    with pytest.raises(RateLimitExceeded) as info:
        await call_with_retries(attempt, settings=RetrySettings(max_delay=10), deadline=Deadline.after(0.2))
    assert info.value.retry_delay == 0.5 and attempt.calls == 1


async def test_non_retryable_failures_are_raised_at_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetrySettings(retry_statuses=(429,), retry_connection_errors=False)
    for failure, expected in (
        (unavailable(500), UpstreamUnavailable),
        (RetryableError(UpstreamUnavailable("refused"), status=0), UpstreamUnavailable),
        (UpstreamRejected("bad", metadata={"http_status": 400}), UpstreamRejected),
    ):
        caplog.clear()
        attempt = Script(failure)
        with caplog.at_level(logging.WARNING, logger="llmgateway.retry"), pytest.raises(expected):
            await call_with_retries(attempt, settings=policy, deadline=NO_DEADLINE)
        assert attempt.calls == 1
        assert [r.getMessage().split()[0] for r in caplog.records] == ["llm_non_retryable_error"]


async def test_unexpected_errors_are_logged_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    attempt = Script(KeyError("boom"))
    with caplog.at_level(logging.WARNING, logger="llmgateway.retry"), pytest.raises(KeyError):
        await call_with_retries(attempt, settings=FAST, deadline=NO_DEADLINE)
    assert caplog.records[0].getMessage().startswith("llm_unexpected_error")
    assert caplog.records[0].levelno == logging.ERROR


async def test_cancellation_during_backoff_is_immediate() -> None:
    policy = RetrySettings(initial_delay=30.0, jitter=0.0, max_delay=60.0)
    attempt = Script(unavailable())
    task = asyncio.ensure_future(call_with_retries(attempt, settings=policy, deadline=NO_DEADLINE))
    await asyncio.sleep(0.05)
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0


async def test_every_decision_is_a_span_event_with_attempt_delay_and_status() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span("chat"):
        await call_with_retries(Script(rate_limited(), unavailable()), settings=FAST, deadline=NO_DEADLINE)
        with pytest.raises(RateLimitExceeded):
            await call_with_retries(
                Script(*[rate_limited() for _ in range(4)]), settings=FAST, deadline=NO_DEADLINE
            )
        with pytest.raises(UpstreamRejected):
            await call_with_retries(
                Script(UpstreamRejected("no", metadata={"http_status": 400})),
                settings=FAST,
                deadline=NO_DEADLINE,
            )
    (span,) = exporter.get_finished_spans()
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    names = [name for name, _ in events]
    assert names == ["llm_retry_attempt"] * 2 + ["llm_retry_attempt"] * 3 + ["llm_max_retries_exceeded"] + [
        "llm_non_retryable_error"
    ]
    first = events[0][1]
    assert first["attempt"] == 1 and first["delay"] == 0.01 and first["status_code"] == 429
    assert events[1][1]["status_code"] == 503
    give_up = events[5][1]
    assert give_up["attempt"] == 4 and give_up["give_up"] == "max_attempts" and give_up["status_code"] == 429
    assert events[6][1]["status_code"] == 400 and events[6][1]["reason"] == "UPSTREAM_REJECTED"
