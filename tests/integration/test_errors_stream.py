"""StreamCreate against failing upstreams: retried only before the first event, never a short answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from server.config import RetrySettings
from tests.fake_upstream import FakeUpstream, Reply, chunk, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import assert_serving, expect

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


async def collect(
    gw: RunningGateway, upstream: FakeUpstream, timeout: float | None = 10
) -> tuple[list[chat_pb2.StreamCreateResponse], grpc.aio.AioRpcError | None]:
    events: list[chat_pb2.StreamCreateResponse] = []
    try:
        async for event in gw.chat.StreamCreate(chat_request(upstream.base_url), timeout=timeout):
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def text_of(events: list[chat_pb2.StreamCreateResponse]) -> str:
    return "".join(e.delta.content for e in events if e.WhichOneof("event") == "delta")


def completions(events: list[chat_pb2.StreamCreateResponse]) -> list[chat_pb2.ChatCompletion]:
    return [e.completion for e in events if e.WhichOneof("event") == "completion"]


# -- before the first event: retried ---------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        Reply(status=429, json_body={"error": {"message": "slow down"}}),
        Reply(status=503, raw=b"busy"),
        Reply(reset=True),
        Reply(sse=text_stream(["never"]), break_after=0),  # 200, then the connection drops
        Reply(sse=[{"error": {"message": "Provider rate limited", "code": 429}}]),  # OpenRouter-style
        Reply(json_body={"error": {"message": "overloaded", "code": 503}}),  # JSON, not SSE
    ],
    ids=["429", "503", "reset", "broken-before-first-event", "error-event-429", "json-error-503"],
)
async def test_failures_before_the_first_event_are_retried(
    gateway: RunningGateway, upstream: FakeUpstream, failure: Reply
) -> None:
    upstream.script(failure, failure, Reply(sse=text_stream(["Hel", "lo"])))
    events, err = await collect(gateway, upstream)
    assert err is None, err
    assert text_of(events) == "Hello"
    assert len(completions(events)) == 1
    assert len(upstream.requests) == 3


async def test_429_stream_after_the_budget_is_resource_exhausted(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(*[Reply(status=429, json_body={"error": {"message": "slow down"}})] * 3)
    events, err = await collect(gateway, upstream)
    assert err is not None and not events
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay is not None
    assert len(upstream.requests) == 3


async def test_stream_retry_after_beyond_the_deadline_stops_at_once(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    retry = RetrySettings(initial_delay=0.01, jitter=0.0, max_delay=30.0, max_attempts=3)
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), retry=retry)
    async with running_gateway(settings) as gw:
        upstream.script(Reply(status=429, headers={"Retry-After": "6"}))
        events, err = await collect(gw, upstream, timeout=3.0)
        assert err is not None and not events
        d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
        assert d.retry_delay == pytest.approx(6.0)
        assert d.metadata["give_up"] == "deadline"
        assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (Reply(status=400, json_body={"error": {"message": "bad"}}), "UPSTREAM_REJECTED"),
        (Reply(sse=["{not json"]), "UPSTREAM_BAD_RESPONSE"),
        (Reply(sse=[{"error": {"message": "content policy"}}]), "UPSTREAM_BAD_RESPONSE"),
        (Reply(raw=b"<html><title>Oops</title></html>", content_type="text/html"), "UPSTREAM_BAD_RESPONSE"),
        (Reply(json_body={"choices": []}), "UPSTREAM_BAD_RESPONSE"),
    ],
    ids=["400", "garbage", "error-event", "html-200", "json-200"],
)
async def test_failures_no_retry_can_fix_are_not_retried(
    gateway: RunningGateway, upstream: FakeUpstream, failure: Reply, reason: str
) -> None:
    upstream.script(failure)
    events, err = await collect(gateway, upstream)
    assert err is not None and not events
    expect(err, grpc.StatusCode.INVALID_ARGUMENT if reason == "UPSTREAM_REJECTED" else UNAVAILABLE, reason)
    assert len(upstream.requests) == 1


# -- after the first event: never retried, never a short answer -------------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(sse=text_stream(["a", "b", "c", "d"]), break_after=3), "UPSTREAM_UNAVAILABLE"),
        (Reply(sse=[*text_stream(["a", "b"])[:3], "{garbage"]), "UPSTREAM_BAD_RESPONSE"),
        (Reply(sse=[*text_stream(["a", "b"])[:3], "[1, 2]"]), "UPSTREAM_BAD_RESPONSE"),
        (Reply(sse=[*text_stream(["a", "b"])[:3], {"choices": [{"delta": "x"}]}]), "UPSTREAM_BAD_RESPONSE"),
        (
            Reply(sse=[*text_stream(["a", "b"])[:3], {"error": {"message": "overloaded", "code": 503}}]),
            "UPSTREAM_UNAVAILABLE",
        ),
        (Reply(sse=text_stream(["a", "b"])[:3]), "UPSTREAM_BAD_RESPONSE"),  # clean EOF, no finish, no [DONE]
        (
            Reply(sse_raw=b"data: " + b'{"choices": [{"index": 0, "delta": {"content": "a"}}]}'[:-5], sse=[]),
            "UPSTREAM_BAD_RESPONSE",
        ),  # cut in the middle of an event
    ],
    ids=["broken", "garbage", "not-object", "bad-shape", "error-503", "eof", "cut-event"],
)
async def test_breakage_after_relaying_ends_unavailable(
    gateway: RunningGateway, upstream: FakeUpstream, reply: Reply, reason: str
) -> None:
    upstream.script(reply, Reply(sse=text_stream(["should", "not", "be", "used"])))
    events, err = await collect(gateway, upstream)
    assert err is not None, "a broken stream must not end OK"
    expect(err, UNAVAILABLE, reason)
    assert not completions(events)  # no answer that looks complete
    assert len(upstream.requests) == 1  # not retried once something was relayed
    await assert_serving(gateway.channel)


async def test_error_event_after_relaying_keeps_its_row(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=[*text_stream(["a"])[:2], {"error": {"message": "quota gone", "code": 429}}]))
    events, err = await collect(gateway, upstream)
    assert err is not None and text_of(events) == "a"
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert "quota gone" in d.message
    assert len(upstream.requests) == 1


async def test_stream_that_goes_silent_within_the_deadline_is_deadline_exceeded(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream(["a", "b", "c"]), hang_after=2))
    started = time.monotonic()
    events, err = await collect(gateway, upstream, timeout=1.5)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5 + 2.0
    assert text_of(events) == "a" and not completions(events)
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await assert_serving(gateway.channel)


async def test_stream_silent_from_the_start_is_deadline_exceeded(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(hang=True))
    events, err = await collect(gateway, upstream, timeout=1.0)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not events
    await asyncio.wait_for(upstream.disconnected.wait(), 5)


async def test_stream_silent_without_a_deadline_is_bounded_by_upstream_timeout(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), upstream_timeout=1.0)
    async with running_gateway(settings) as gw:
        for reply in (Reply(sse=text_stream(["a", "b"]), hang_after=2), Reply(hang=True)):
            upstream.disconnected.clear()
            upstream.script(reply)
            started = time.monotonic()
            events, err = await asyncio.wait_for(collect(gw, upstream, timeout=None), 30)
            assert err is not None
            expect(err, UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
            assert 0.9 <= time.monotonic() - started < 1.0 + 5.0
            assert not completions(events)
            await asyncio.wait_for(upstream.disconnected.wait(), 5)
        assert len(upstream.requests) == 2  # silence is not retried
        await assert_serving(gw.channel)


async def test_slow_but_steady_stream_completes(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            sse=[chunk({"content": w}) for w in "abc"] + [chunk({}, finish_reason="stop"), "[DONE]"],
            chunk_delay=0.1,
        )
    )
    events, err = await collect(gateway, upstream, timeout=10)
    assert err is None and text_of(events) == "abc" and len(completions(events)) == 1
