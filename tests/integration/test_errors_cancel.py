"""Cancellation and deadlines close the upstream request at once and leave nothing behind.

Observed from the fake upstream's side (its handler is cancelled when the connection goes) and
from the gateway's (no task, no acquired pooled connection is left).
"""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_errors_support import assert_serving, wait_for


def acquired(gw: RunningGateway) -> int:
    """Pooled connections the gateway's HTTP client holds right now."""
    running = gw.server._running  # noqa: SLF001 - test introspection
    assert running is not None
    return running.http.connections_in_use


def task_count() -> int:
    return len([t for t in asyncio.all_tasks() if not t.done()])


async def settled(gw: RunningGateway, upstream: FakeUpstream, baseline: int) -> None:
    assert await wait_for(lambda: upstream.in_flight == 0, 5), "the upstream request is still open"
    assert await wait_for(lambda: acquired(gw) == 0, 5), f"{acquired(gw)} connection(s) still acquired"
    gc.collect()
    assert await wait_for(lambda: task_count() <= baseline, 5), (
        f"{task_count()} tasks, baseline {baseline}: {asyncio.all_tasks()}"
    )


async def warm_up(gw: RunningGateway, upstream: FakeUpstream) -> int:
    """One successful call first, so pools and lazily started tasks exist before the baseline."""
    upstream.script(Reply(json_body=completion()), Reply(sse=text_stream(["x"])))
    await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
    async for _ in gw.chat.StreamCreate(chat_request(upstream.base_url), timeout=10):
        pass
    await asyncio.sleep(0.2)
    return task_count()


async def test_cancelled_unary_call_closes_the_upstream_request(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    baseline = await warm_up(gateway, upstream)
    upstream.replies.clear()
    upstream.arrived.clear()
    upstream.script(Reply(hang=True))
    call = gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    assert upstream.in_flight == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert upstream.disconnects == 1
    await settled(gateway, upstream, baseline)
    await assert_serving(gateway.channel)


async def test_cancelled_stream_closes_the_upstream_request(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    baseline = await warm_up(gateway, upstream)
    upstream.replies.clear()
    upstream.script(Reply(sse=text_stream(["a", "b", "c"]), hang_after=2))
    call = gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30)
    first = await call.read()
    assert first.delta.content == "a"
    assert upstream.in_flight == 1
    call.cancel()
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await settled(gateway, upstream, baseline)
    await assert_serving(gateway.channel)


async def test_cancelled_stream_before_its_first_event(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    baseline = await warm_up(gateway, upstream)
    upstream.replies.clear()
    upstream.arrived.clear()
    upstream.script(Reply(hang=True))
    call = gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30)
    reader = asyncio.ensure_future(call.read())
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await settled(gateway, upstream, baseline)


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_closes_the_upstream_request(
    gateway: RunningGateway, upstream: FakeUpstream, stream: bool
) -> None:
    baseline = await warm_up(gateway, upstream)
    upstream.replies.clear()
    upstream.script(Reply(sse=text_stream(["a", "b"]), hang_after=1) if stream else Reply(hang=True))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if stream:
            async for _ in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=1.0):
                pass
        else:
            await gateway.chat.Create(chat_request(upstream.base_url), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await settled(gateway, upstream, baseline)
    await assert_serving(gateway.channel)


async def test_many_cancelled_calls_leave_nothing_behind(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """Many concurrent calls cancelled mid-flight (sleeping, hanging, streaming): nothing leaks."""
    baseline = await warm_up(gateway, upstream)
    upstream.replies.clear()
    upstream.default = Reply(hang=True)
    calls = [gateway.chat.Create(chat_request(upstream.base_url), timeout=30) for _ in range(10)]
    streams = [gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30) for _ in range(10)]
    readers = [asyncio.ensure_future(s.read()) for s in streams]
    assert await wait_for(lambda: upstream.in_flight == 20, 10), upstream.in_flight
    for c in calls:
        c.cancel()
    for s in streams:
        s.cancel()
    await asyncio.gather(*calls, *readers, return_exceptions=True)
    assert await wait_for(lambda: upstream.disconnects == 20, 10), upstream.disconnects
    await settled(gateway, upstream, baseline)
    upstream.default = Reply(sse=text_stream(["ok"]))
    async for _ in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10):
        pass
    # Nothing was retried behind the caller's back.
    assert len(upstream.requests) == 2 + 20 + 1
