"""SIGTERM with calls in flight, seen from outside: the real `llm-gateway serve` as a subprocess,
a real slow loopback upstream, then the statuses the callers got and the traces in SQLite.

- Streams still running when the grace period ends are cut: each ends with UNAVAILABLE and an
  ErrorInfo saying SHUTTING_DOWN (never OK, never a bare CANCELLED), and each is traced as
  cancelled by shutdown before the trace writer closes.
- Unary calls sent before the signal either finish or fail UNAVAILABLE with an ErrorInfo;
  none gets a bare CANCELLED without reaching the upstream while the grace period had room.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import chat_request
from tests.process_harness import start_server_process


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason in the trailers, None when there is none (a bare status)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return None


def stored_traces(db: Path) -> dict[str, tuple[str, str]]:
    """step_id -> (error_type, error_message) of every trace in the SQLite file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step_id, error_type, error_message FROM provider_traces").fetchall()
    return {step: (error_type, message) for step, error_type, message in rows}


def traced(upstream: FakeUpstream, step: str) -> chat_pb2.CreateRequest:
    return chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id=step, run_id="shutdown"))


async def wait_until(predicate: object, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_streams_cut_by_the_grace_period_end_unavailable_and_are_traced(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    count = 10
    words = [f"w{i} " for i in range(60)]
    # ~12 s per stream: far past the 2 s grace period.
    upstream.script(*(Reply(sse=text_stream(words), chunk_delay=0.2) for _ in range(count)))
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "2"],
        sqlite_path=db,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            streams = [
                chat.StreamCreate(
                    chat_pb2.StreamCreateRequest.FromString(traced(upstream, f"s{i}").SerializeToString()),
                    timeout=60,
                )
                for i in range(count)
            ]
            # Every stream is running (its first delta arrived) before the signal.
            events: list[list[chat_pb2.StreamCreateResponse]] = [[await s.read()] for s in streams]
            server.send_signal(signal.SIGTERM)

            async def drain(i: int) -> None:
                while (event := await streams[i].read()) is not grpc.aio.EOF:
                    events[i].append(event)

            outcomes = await asyncio.wait_for(
                asyncio.gather(*(drain(i) for i in range(count)), return_exceptions=True), 30
            )
            code = await asyncio.to_thread(server.wait, 30)
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    for i, outcome in enumerate(outcomes):
        # A cut stream must not look complete: no final completion, a non-OK status.
        assert all(e.WhichOneof("event") == "delta" for e in events[i]), f"stream {i} got a completion"
        assert isinstance(outcome, grpc.aio.AioRpcError), f"stream {i} ended with {outcome!r}"
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, (i, outcome.code(), outcome.details())
        assert error_reason(outcome) == "SHUTTING_DOWN", (i, outcome.details())
    traces = stored_traces(db)
    missing = [f"s{i}" for i in range(count) if f"s{i}" not in traces]
    assert not missing, f"{len(missing)} of {count} stream traces lost on SIGTERM:\n{server.log[-3000:]}"
    for i in range(count):
        error_type, message = traces[f"s{i}"]
        assert error_type == "SHUTTING_DOWN", (i, error_type, message)
        assert "shutdown" in message
    assert "dropping a trace" not in server.log


async def test_unary_calls_in_flight_at_sigterm_never_get_a_bare_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    count = 150
    # Each answer takes 1 s: all of them fit in the 10 s grace period.
    upstream.default = Reply(json_body=completion(), delay=1.0)
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "10"],
        sqlite_path=db,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            # One call first: the channel is connected before the burst (so every call of the burst
            # is sent on an established connection, before the signal).
            await chat.Create(traced(upstream, "warm"), timeout=30)
            upstream.requests.clear()
            calls = [chat.Create(traced(upstream, f"u{i}"), timeout=60) for i in range(count)]
            # The burst is on the wire; the gateway is still handing calls to its handlers.
            assert await wait_until(lambda: len(upstream.requests) >= 1, 20), server.log[-3000:]
            server.send_signal(signal.SIGTERM)
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
            code = await asyncio.to_thread(server.wait, 30)
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    bare = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, grpc.aio.AioRpcError):
            # A failure is UNAVAILABLE with an ErrorInfo the caller can act on (retry elsewhere).
            if outcome.code() != grpc.StatusCode.UNAVAILABLE or error_reason(outcome) is None:
                bare.append((i, outcome.code(), outcome.details()))
        else:
            assert isinstance(outcome, chat_pb2.CreateResponse), outcome
    assert not bare, f"{len(bare)} of {count} calls got a bare status: {bare[:5]}\n{server.log[-2000:]}"
    traces = stored_traces(db)
    answered = [f"u{i}" for i, o in enumerate(outcomes) if isinstance(o, chat_pb2.CreateResponse)]
    assert answered, "no call was answered"
    missing = [step for step in answered if step not in traces]
    assert not missing, f"{len(missing)} traces of answered calls lost:\n{server.log[-3000:]}"
    assert all(traces[step][0] == "" for step in answered)
