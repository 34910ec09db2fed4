"""A deployment's `timeout_seconds` (issue 16), through the real gRPC server and real fake
upstreams: for a stream it bounds the time to the first event (while a fallback is still
possible), never an answer already flowing, which runs under the caller's deadline only; for a
unary call it bounds the whole attempt. A timed-out attempt's trace says it timed out (the
deployment's timeout_seconds, not the caller's deadline, not a cancellation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, traces_pb2

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.integration.test_errors_support import details
from tests.integration.test_routing_e2e import KEYS, deployment, gateway_with, routed, routes_toml
from tests.trace_polling import wait_for_count, wait_for_trace


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream() for _ in range(2)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture(autouse=True)
def route_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def a_then_b(fakes: list[FakeUpstream], timeout: float = 0.3) -> str:
    # A's weight makes it first (the chance B goes first is 1e-21); only A has a timeout.
    return routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, timeout_seconds=timeout),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        },
        cooldown_seconds=0,
    )


async def traces_of(gw: object, step: str, count: int) -> dict[str, traces_pb2.ProviderTrace]:
    """The step's traces (one per attempt) by deployment."""
    request = traces_pb2.ListProviderTracesRequest(step_id=step, page_size=100)
    found = await wait_for_count(gw.traces, count, request)  # type: ignore[attr-defined]
    return {t.deployment: t for t in found}


def assert_timed_out_by_its_timeout(trace: traces_pb2.ProviderTrace, timeout: float) -> None:
    assert trace.error_type == "DEADLINE_EXCEEDED", (trace.error_type, trace.error_message)
    assert f"timeout_seconds ({timeout:g} s)" in trace.error_message, trace.error_message
    assert "caller" not in trace.error_message  # neither its deadline nor a cancellation


async def test_a_stream_flowing_past_timeout_seconds_is_not_cut(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # The reviewer's reproduction: 6 chunks 100 ms apart from a deployment with a 0.3 s timeout.
    text = routes_toml({"chat": ({}, [deployment("a", fakes[0].base_url, timeout_seconds=0.3)])})
    fakes[0].script(Reply(sse=text_stream(["w"] * 6), chunk_delay=0.1))
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        events = [e async for e in gw.chat.StreamCreate(routed(step="s-flow"), timeout=10)]
        elapsed = time.monotonic() - started
        trace = await wait_for_trace(gw.traces, "s-flow", trace_id=events[-1].provider_trace_id)
    assert events[-1].completion.choices[0].message.content == "w" * 6
    assert sum(1 for e in events if e.HasField("delta")) >= 1
    assert elapsed >= 0.6  # it really streamed past the 0.3 s timeout
    assert (events[-1].deployment.name, events[-1].deployment.attempts) == ("a", 1)
    assert trace.error_type == "" and [(a.deployment, a.status) for a in trace.attempts] == [("chat/a", "OK")]


# Nothing a caller would see within A's 0.3 s: no answer at all, a 200 whose role chunk is not an
# event and then silence, or a first text chunk that comes too late.
SILENT = {
    "no_answer": Reply(hang=True),
    "role_chunk_then_silence": Reply(sse=text_stream(["late"]), hang_after=1),
    "first_text_too_late": Reply(sse=text_stream(["late"]), delay=1.5),
}


@pytest.mark.parametrize("silence", list(SILENT))
async def test_a_stream_with_no_first_event_within_timeout_seconds_falls_back(
    tmp_path: Path, fakes: list[FakeUpstream], silence: str
) -> None:
    fakes[0].script(SILENT[silence])
    fakes[1].script(Reply(sse=text_stream(["from", " b"])))
    step = f"s-{silence}"
    async with await gateway_with(tmp_path, a_then_b(fakes)) as gw:
        started = time.monotonic()
        events = [e async for e in gw.chat.StreamCreate(routed(step=step), timeout=10)]
        elapsed = time.monotonic() - started
        traces = await traces_of(gw, step, 2)
        await fakes[0].disconnected.wait()  # A's request was abandoned: its connection closed
    assert events[-1].completion.choices[0].message.content == "from b"
    assert (events[-1].deployment.name, events[-1].deployment.attempts) == ("b", 2)
    assert 0.3 <= elapsed < 1.4, elapsed  # A's timeout, not its late answer nor the caller's 10 s
    assert [(a.deployment, a.status) for a in traces["chat/b"].attempts] == [
        ("chat/a", "DEADLINE_EXCEEDED"),
        ("chat/b", "OK"),
    ]
    assert_timed_out_by_its_timeout(traces["chat/a"], 0.3)
    assert 0.3 <= traces["chat/b"].attempts[0].latency_ms / 1000 < 1.4


async def test_a_stream_that_stalls_after_its_first_event_runs_to_the_callers_deadline(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # Role chunk and one word in time, then silence forever: the word went out, so nothing can
    # fall back; the caller's deadline (not A's 0.3 s) ends it. (Whether the gateway's status
    # beats the caller's own timer is the 50 ms answer room's business, tested in the review file.)
    fakes[0].script(Reply(sse=text_stream(["w", " never sent"]), hang_after=2))
    fakes[1].default = Reply(sse=text_stream(["never"]))
    deadline = 1.5
    received: list[chat_pb2.StreamCreateResponse] = []
    async with await gateway_with(tmp_path, a_then_b(fakes)) as gw:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in gw.chat.StreamCreate(routed(step="s-stall"), timeout=deadline):
                received.append(event)
        elapsed = time.monotonic() - started
        traces = await traces_of(gw, "s-stall", 1)
    assert [e.delta.content for e in received] == ["w"]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadline - 0.3 <= elapsed < deadline + 0.3, elapsed
    assert fakes[1].requests == []  # nothing fell back after the first event
    trace = traces["chat/a"]
    assert trace.error_type == "DEADLINE_EXCEEDED"
    assert "caller's deadline" in trace.error_message, trace.error_message
    assert [(a.deployment, a.status) for a in trace.attempts] == [("chat/a", "DEADLINE_EXCEEDED")]
    assert trace.attempts[0].latency_ms / 1000 >= deadline - 0.3


async def test_every_stream_attempt_timing_out_is_unavailable_saying_timeout_seconds(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    text = routes_toml({"chat": ({}, [deployment("a", fakes[0].base_url, timeout_seconds=0.3)])})
    fakes[0].script(Reply(hang=True))
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gw.chat.StreamCreate(routed(step="s-alone"), timeout=10):
                pass
        elapsed = time.monotonic() - started
        traces = await traces_of(gw, "s-alone", 1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.3 <= elapsed < 2, elapsed
    assert "timeout_seconds (0.3 s)" in (caught.value.details() or "")
    info = details(caught.value).info
    assert (info.metadata["attempts"], info.metadata["deployments"]) == ("1", "chat/a")
    assert_timed_out_by_its_timeout(traces["chat/a"], 0.3)


async def test_unary_timeout_seconds_still_bounds_the_whole_attempt(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # A unary answer arrives as one piece: A's 0.3 s bounds it whole, and B answers.
    fakes[0].script(Reply(json_body=completion("too late"), delay=1.5))
    fakes[1].script(Reply(json_body=completion("from b")))
    async with await gateway_with(tmp_path, a_then_b(fakes)) as gw:
        started = time.monotonic()
        response = await gw.chat.Create(routed(step="s-unary"), timeout=10)
        elapsed = time.monotonic() - started
        traces = await traces_of(gw, "s-unary", 2)
        # An answer inside the timeout is A's.
        fakes[0].script(Reply(json_body=completion("in time"), delay=0.05))
        quick = await gw.chat.Create(routed(), timeout=10)
    assert response.completion.choices[0].message.content == "from b"
    assert 0.3 <= elapsed < 1.4, elapsed
    assert [(a.deployment, a.status) for a in traces["chat/b"].attempts] == [
        ("chat/a", "DEADLINE_EXCEEDED"),
        ("chat/b", "OK"),
    ]
    assert_timed_out_by_its_timeout(traces["chat/a"], 0.3)
    assert (quick.deployment.name, quick.completion.choices[0].message.content) == ("a", "in time")


async def test_a_caller_cancelling_while_the_first_event_is_awaited_stays_a_cancellation(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # The first-event timer (A's 2 s) is not what ended it: the trace says the caller cancelled,
    # and nothing falls back.
    fakes[0].script(Reply(hang=True))
    async with await gateway_with(tmp_path, a_then_b(fakes, timeout=2.0)) as gw:
        call = gw.chat.StreamCreate(routed(step="s-cancel"), timeout=10)
        await asyncio.wait_for(fakes[0].arrived.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            async for _ in call:
                pass
        traces = await traces_of(gw, "s-cancel", 1)
        await asyncio.wait_for(fakes[0].disconnected.wait(), 5)
    trace = traces["chat/a"]
    assert (trace.error_type, trace.error_message) == ("CANCELLED", "the caller cancelled the call")
    assert [(a.deployment, a.status) for a in trace.attempts] == [("chat/a", "CancelledError")]
    assert fakes[1].requests == []
