"""Unary Create against failing upstreams: retries, backoff, Retry-After, deadlines, the status table.

Timing assertions are one-sided and generous (a loaded 2-core CI machine): "waited at least the
backoff", "stopped before the deadline"; attempt counts are exact.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.config import RetrySettings
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import assert_serving, details, expect

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


async def fail(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def slow_gateway(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    """Backoff long enough to measure: 0.2 s, 0.4 s, ... (no jitter), up to 5 attempts."""
    retry = RetrySettings(initial_delay=0.2, multiplier=2.0, jitter=0.0, max_delay=10.0, max_attempts=5)
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), retry=retry)
    async with running_gateway(settings) as running:
        yield running


# -- 429 -------------------------------------------------------------------------------------


async def test_429_is_retried_until_it_succeeds(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(status=429, json_body={"error": {"message": "slow down"}}),
        Reply(status=429, json_body={"error": {"message": "slow down"}}),
    )
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    assert response.completion.choices[0].message.content == "Hello!"
    assert len(upstream.requests) == 3


async def test_429_after_the_budget_is_resource_exhausted_with_retry_info(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(
        *[Reply(status=429, json_body={"error": {"message": "Rate limit reached for gpt-4o"}})] * 5
    )
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert len(upstream.requests) == 3  # FAST_RETRY: max_attempts=3
    assert "Rate limit reached for gpt-4o" in d.message  # the provider's message is passed on
    assert d.metadata["http_status"] == "429"
    assert d.metadata["attempts"] == "3"
    assert d.metadata["max_attempts"] == "3"
    assert d.metadata["give_up"] == "max_attempts"
    assert d.retry_delay is not None and d.retry_delay > 0
    assert not d.bad_requests
    await assert_serving(gateway.channel)


# -- 5xx and connection errors ---------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_retried_then_unavailable(
    gateway: RunningGateway, upstream: FakeUpstream, status: int
) -> None:
    upstream.script(*[Reply(status=status, json_body={"error": {"message": f"upstream broke {status}"}})] * 5)
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert len(upstream.requests) == 3
    assert f"upstream broke {status}" in d.message
    assert d.metadata["http_status"] == str(status)
    assert d.metadata["attempts"] == "3"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_then_success(gateway: RunningGateway, upstream: FakeUpstream, status: int) -> None:
    upstream.script(Reply(status=status, raw=b"oops"))
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    assert response.completion.id == "chatcmpl-abc123"
    assert len(upstream.requests) == 2


async def test_retried_statuses_are_configurable(tmp_path: Path, upstream: FakeUpstream) -> None:
    retry = RetrySettings(
        initial_delay=0.01, jitter=0.0, max_attempts=3, retry_statuses=(502,), retry_connection_errors=False
    )
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), retry=retry)
    async with running_gateway(settings) as gw:
        upstream.script(Reply(status=503, raw=b"no"))
        err = await fail(gw.chat.Create(chat_request(upstream.base_url), timeout=10))
        expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        assert len(upstream.requests) == 1  # 503 is not in retry_statuses

        upstream.script(Reply(status=502, raw=b"no"), Reply(status=502, raw=b"no"))
        response = await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
        assert response.completion.id
        assert len(upstream.requests) == 4

        upstream.script(Reply(status=429), Reply(status=429))  # 429 is retried whatever the setting
        await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
        assert len(upstream.requests) == 7

        upstream.script(Reply(reset=True))
        err = await fail(gw.chat.Create(chat_request(upstream.base_url), timeout=10))
        expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        assert len(upstream.requests) == 8  # connection errors not retried here


async def test_connection_reset_is_retried(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(reset=True), Reply(reset=True))
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    assert response.completion.id
    assert len(upstream.requests) == 3

    upstream.script(*[Reply(reset=True)] * 3)
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert d.metadata["attempts"] == "3"


async def test_unreachable_upstream_is_unavailable_after_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    settings = make_settings(tmp_path, allowed_endpoints=(url,))
    async with running_gateway(settings) as gw:
        err = await fail(gw.chat.Create(chat_request(url), timeout=10))
        d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        assert d.metadata["attempts"] == "3"
        assert "could not be reached" in d.message
        await assert_serving(gw.channel)


# -- backoff and Retry-After -----------------------------------------------------------------


async def test_backoff_grows_exponentially(slow_gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(*[Reply(status=503)] * 3)
    await slow_gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    at = [r.at for r in upstream.requests]
    assert len(at) == 4
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    # 0.2, 0.4, 0.8 s (jitter 0): never shorter; longer only by scheduling noise.
    for gap, wanted in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert gap >= wanted * 0.95, gaps


@pytest.mark.parametrize(
    ("headers", "at_least"),
    [
        ({"Retry-After": "1"}, 0.95),
        ({"retry-after-ms": "700"}, 0.65),
        ({"Retry-After": "0.5", "retry-after-ms": "900"}, 0.85),  # the ms header wins
    ],
)
async def test_retry_after_is_honoured(
    slow_gateway: RunningGateway, upstream: FakeUpstream, headers: dict[str, str], at_least: float
) -> None:
    upstream.script(Reply(status=429, json_body={"error": {"message": "wait"}}, headers=headers))
    await slow_gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    first, second = upstream.requests
    assert second.at - first.at >= at_least


async def test_retry_after_http_date_is_honoured(
    slow_gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    when = email.utils.formatdate(time.time() + 2.0, usegmt=True)  # whole seconds: 1 to 2 s from now
    upstream.script(Reply(status=503, headers={"Retry-After": when}))
    await slow_gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    first, second = upstream.requests
    assert second.at - first.at >= 0.9


async def test_retry_after_beyond_the_deadline_stops_at_once(
    slow_gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(status=429, json_body={"error": {"message": "quota"}}, headers={"Retry-After": "7"})
    )
    started = time.monotonic()
    err = await fail(slow_gateway.chat.Create(chat_request(upstream.base_url), timeout=3))
    elapsed = time.monotonic() - started
    # RESOURCE_EXHAUSTED, not DEADLINE_EXCEEDED: the gateway did not sleep into the deadline.
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay == pytest.approx(7.0, abs=0.01)
    assert d.metadata["give_up"] == "deadline"
    assert len(upstream.requests) == 1
    assert elapsed < 3.0


async def test_5xx_retry_after_beyond_the_deadline_is_unavailable_with_retry_info(
    slow_gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(status=503, raw=b"maintenance", headers={"Retry-After": "8"}))
    err = await fail(slow_gateway.chat.Create(chat_request(upstream.base_url), timeout=3))
    d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert d.retry_delay == pytest.approx(8.0, abs=0.01)
    assert "maintenance" in d.message
    assert len(upstream.requests) == 1


async def test_retry_after_beyond_max_delay_is_handed_back(tmp_path: Path, upstream: FakeUpstream) -> None:
    # No caller deadline at all: a 1-hour Retry-After is not slept through either.
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        upstream.script(Reply(status=429, headers={"Retry-After": "3600"}))
        err = await fail(gw.chat.Create(chat_request(upstream.base_url)))
        d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
        assert d.retry_delay == 3600.0
        assert d.metadata["give_up"] == "retry_after_too_long"


async def test_backoff_never_sleeps_past_the_deadline(tmp_path: Path, upstream: FakeUpstream) -> None:
    retry = RetrySettings(initial_delay=1.0, multiplier=4.0, jitter=0.0, max_delay=30.0, max_attempts=10)
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), retry=retry)
    async with running_gateway(settings) as gw:
        upstream.script(*[Reply(status=503)] * 10)
        started = time.monotonic()
        err = await fail(gw.chat.Create(chat_request(upstream.base_url), timeout=4.0))
        elapsed = time.monotonic() - started
        # Attempt 1 at 0 s, sleep 1 s, attempt 2; the next sleep (4 s) would cross the deadline:
        # UNAVAILABLE at once (about 1 s in), not DEADLINE_EXCEEDED at 4 s.
        d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        assert len(upstream.requests) == 2
        assert d.retry_delay == pytest.approx(4.0)
        assert d.metadata["give_up"] == "deadline"
        assert 0.95 <= elapsed < 4.0


# -- 4xx: not retried ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
        (409, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
        (413, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
        (422, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
        (401, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED"),
        (403, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED"),
        (404, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (408, UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    ],
)
async def test_4xx_maps_to_its_row_without_retry(
    gateway: RunningGateway, upstream: FakeUpstream, status: int, code: grpc.StatusCode, reason: str
) -> None:
    message = f"The model `gpt-x` said no ({status})"
    upstream.script(
        Reply(status=status, json_body={"error": {"message": message, "type": "invalid_request_error"}})
    )
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, code, reason)
    assert message in d.message
    assert d.metadata["http_status"] == str(status)
    assert d.metadata["provider"] == "openai"
    assert not d.retry_infos
    assert len(upstream.requests) == 1


# -- bad upstreams ---------------------------------------------------------------------------

HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>"


@pytest.mark.parametrize(
    ("reply", "code", "reason", "needle"),
    [
        (
            Reply(status=502, raw=HTML, content_type="text/html"),
            UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "502 Bad Gateway",
        ),
        (
            Reply(status=200, raw=HTML, content_type="text/html"),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "not JSON",
        ),
        (Reply(raw=b"this is not json"), UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", "not JSON"),
        (
            Reply(raw=b"\xff\xfe\x00garbage", content_type="application/json"),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "not JSON",
        ),
        (Reply(json_body=[1, 2, 3]), UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", "not an object"),
        (
            Reply(json_body={"id": "x", "object": "chat.completion"}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "without choices",
        ),
        (
            Reply(json_body={"id": "x", "choices": []}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "without choices",
        ),
        (Reply(json_body={"choices": "nope"}), UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", "choices"),
        (Reply(json_body={"choices": [1]}), UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", "choices[0]"),
        (Reply(json_body={"choices": [{"message": "hi"}]}), UNAVAILABLE, "UPSTREAM_BAD_RESPONSE", "message"),
        (
            Reply(json_body={"choices": [{"index": "zero", "message": {"content": "hi"}}]}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "index",
        ),
        (
            Reply(json_body={"choices": [{"message": {"content": 42}}]}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "content",
        ),
        (
            Reply(json_body={**completion(), "usage": {"prompt_tokens": "many"}}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "usage",
        ),
        (
            Reply(json_body={**completion(), "usage": {"prompt_tokens": 2**40}}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "usage",
        ),
        (
            Reply(json_body={"choices": [{"message": {"tool_calls": [{"function": {"arguments": {}}}]}}]}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "tool_calls",
        ),
        (
            Reply(json_body={"error": {"message": "The server had an error processing your request"}}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "The server had an error processing your request",
        ),
        (
            Reply(json_body={"error": "plain text error"}),
            UNAVAILABLE,
            "UPSTREAM_BAD_RESPONSE",
            "plain text error",
        ),
        (
            Reply(json_body={"error": {"message": "bad model", "code": 400}}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPSTREAM_REJECTED",
            "bad model",
        ),
        (
            Reply(json_body={"error": {"message": "who are you", "code": "401"}}),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPSTREAM_AUTH_FAILED",
            "who are you",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_bad_upstream_answers_map_to_the_table(
    gateway: RunningGateway,
    upstream: FakeUpstream,
    reply: Reply,
    code: grpc.StatusCode,
    reason: str,
    needle: str,
) -> None:
    upstream.script(*[reply] * 3)
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, code, reason)
    assert needle in d.message
    await assert_serving(gateway.channel)
    # ...and the next call works.
    upstream.replies.clear()
    assert (await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)).completion.id


async def test_200_carrying_a_rate_limit_error_is_retried(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # OpenRouter answers some provider errors with HTTP 200 and an error object.
    upstream.script(
        Reply(json_body={"error": {"message": "Provider rate limited", "code": 429}}),
        Reply(json_body={"error": {"message": "Provider down", "code": 502}}),
    )
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    assert response.completion.id
    assert len(upstream.requests) == 3

    upstream.script(*[Reply(json_body={"error": {"message": "Provider rate limited", "code": 429}})] * 3)
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=10))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert "Provider rate limited" in d.message


async def test_silent_upstream_within_the_deadline_is_deadline_exceeded(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(hang=True))
    started = time.monotonic()
    err = await fail(gateway.chat.Create(chat_request(upstream.base_url), timeout=1.0))
    elapsed = time.monotonic() - started
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.0 + 2.0  # the deadline plus generous slack
    # The gateway dropped the upstream request too.
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert len(upstream.requests) == 1
    await assert_serving(gateway.channel)


async def test_silent_upstream_without_a_deadline_is_bounded_by_upstream_timeout(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), upstream_timeout=1.0)
    async with running_gateway(settings) as gw:
        upstream.script(Reply(hang=True))
        started = time.monotonic()
        err = await fail(asyncio.wait_for(gw.chat.Create(chat_request(upstream.base_url)), 30))
        elapsed = time.monotonic() - started
        d = expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        assert d.metadata["timeout_seconds"] == "1.0"
        assert 0.9 <= elapsed < 1.0 + 5.0
        assert len(upstream.requests) == 1  # a timeout is not retried
        await asyncio.wait_for(upstream.disconnected.wait(), 5)
        await assert_serving(gw.channel)


async def test_slow_answer_within_the_deadline_succeeds(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body=completion("late"), delay=0.3))
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    assert response.completion.choices[0].message.content == "late"


# -- secrets ---------------------------------------------------------------------------------

SECRET = "sk-proj-SuperSecretKeyValue0123456789abcdef"


@pytest.mark.parametrize(
    "make_reply",
    [
        lambda key: Reply(
            status=401, json_body={"error": {"message": f"Incorrect API key provided: {key}."}}
        ),
        lambda key: Reply(status=400, json_body={"error": {"message": f"bad request for Bearer {key}"}}),
        lambda key: Reply(status=200, json_body={"error": {"message": f"your key {key} is over quota"}}),
        lambda key: Reply(status=200, raw=f"<html>key={key}</html>".encode()),
        lambda key: Reply(status=500, raw=f"Authorization: Bearer {key}".encode()),
        lambda key: Reply(status=429, json_body={"error": {"message": key, "key": key}}),
        lambda key: Reply(status=403, raw=key.encode()),
    ],
)
async def test_no_key_ever_reaches_the_client(
    tmp_path: Path, upstream: FakeUpstream, make_reply: Any
) -> None:
    settings = make_settings(
        tmp_path, openai_base_url=upstream.base_url, openai_api_key=SECRET, allowed_endpoints=()
    )
    async with running_gateway(settings) as gw:
        upstream.script(*[make_reply(SECRET)] * 3)
        err = await fail(gw.chat.Create(chat_request(upstream.base_url), timeout=10))
        d = details(err)
        assert upstream.requests[0].headers["Authorization"] == f"Bearer {SECRET}"  # it was really sent
        text = (
            d.text()
            + repr(err.trailing_metadata())
            + repr(err.initial_metadata())
            + str(err.debug_error_string())
        )
        for fragment in (SECRET, SECRET[8:], SECRET[-16:]):
            assert fragment not in text
        # Streams too.
        upstream.script(*[make_reply(SECRET)] * 3)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in gw.chat.StreamCreate(chat_request(upstream.base_url), timeout=10):
                pass
        d = details(info.value)
        assert SECRET not in d.text() and SECRET[-16:] not in d.text()


# -- local servers ---------------------------------------------------------------------------


async def test_unparseable_local_model_output(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    request = chat_request(upstream.base_url)
    request.llm_config.model_endpoint_type = "vllm"
    request.functions.add(name="send_message", description="Send a message")
    upstream.script(
        Reply(
            json_body={
                "choices": [{"index": 0, "text": "I refuse to answer in JSON", "finish_reason": "stop"}]
            }
        )
    )
    err = await fail(gateway.chat.Create(request, timeout=10))
    expect(err, UNAVAILABLE, "UNPARSEABLE_MODEL_OUTPUT")
    await assert_serving(gateway.channel)
