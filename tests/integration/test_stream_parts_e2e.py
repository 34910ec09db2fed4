"""A stream the grace period's end finds in grpc's write, whose caller then reads on: the cut only
marks it, and InFlight.stream ends it before its next message (the gateway's own generator
closed there, with no servicer generator around it). A real gateway in-process, a loopback
upstream sending big chunks, a real grpc client that stops reading, then reads on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_hardening_shutdown import error_reason, stored_traces, traced, wait_until
from tests.integration.test_lifecycle_review import counted, request_counts


async def test_a_stream_marked_cut_whose_caller_reads_on_ends_shutting_down_and_is_traced(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    model = "revchunk-marked-model"
    upstream.script(Reply(sse=text_stream(["x" * 16384 for _ in range(400)]), chunk_delay=0.001))
    db = tmp_path / "gateway.db"
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), sqlite_path=str(db))
    async with running_gateway(settings) as gw:
        before = request_counts("StreamCreate", model)
        request = traced(upstream, "marked")
        request.llm_config.model = model
        call = gw.chat.StreamCreate(
            chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()), timeout=30
        )
        first = await call.read()
        assert first.WhichOneof("event") == "delta"
        await asyncio.sleep(0.5)  # grpc's window fills: the handler waits in its write
        running = gw.server._running  # noqa: SLF001 - the registry the drain cuts
        assert running is not None
        stopping = asyncio.ensure_future(gw.server.stop(grace=0.5))
        # The cut comes about 1 s in (later on a loaded machine), grpc's own cancel 2 s
        # (CUT_ALLOWANCE) after it: read on between the two, so the write returns and the marked
        # stream ends itself.
        calls = running.calls._calls
        assert await wait_until(lambda: bool(calls) and all(c.cut for c in calls), 10), "no cut"
        assert all(not c.ended_by_cut for c in calls), "the cut found it running: not in grpc's write"
        await asyncio.sleep(0.2)
        deltas = 1
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                assert event.WhichOneof("event") == "delta"  # cut: never a completion
                deltas += 1
        except grpc.aio.AioRpcError as exc:
            outcome: object = exc
        else:
            outcome = "ended OK"
        await stopping
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, (outcome.code(), outcome.details())
        assert error_reason(outcome) == "SHUTTING_DOWN"
        assert deltas < 400
        assert await counted("StreamCreate", model, before, 1) == {"UNAVAILABLE": 1}
    error_type, message = stored_traces(db)["marked"]
    assert error_type == "SHUTTING_DOWN", (error_type, message)


async def test_paced_streams_ending_badly_are_counted_and_traced_as_their_callers_see_them(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A caller cancelling mid-stream, a deadline passing mid-stream, the upstream breaking after
    the first deltas: each counted with the status its caller got, never OK, and traced so."""
    words = [f"w{i} " for i in range(40)]
    db = tmp_path / "gateway.db"
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), sqlite_path=str(db))
    async with running_gateway(settings) as gw:

        async def run(step: str, reply: Reply, timeout: float, reads: int | None) -> object:
            upstream.script(reply)
            request = traced(upstream, step)
            request.llm_config.model = f"revchunk-{step}"
            call = gw.chat.StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()), timeout=timeout
            )
            got = 0
            try:
                while (event := await call.read()) is not grpc.aio.EOF:
                    assert event.WhichOneof("event") == "delta", step
                    got += 1
                    if reads is not None and got == reads:
                        call.cancel()
                        return "cancelled"
            except grpc.aio.AioRpcError as exc:
                assert got >= 1, step  # it failed mid-stream, after deltas went out
                return exc.code()
            except asyncio.CancelledError:
                return "cancelled"
            return "ended OK"

        cases = {
            "cancel": (Reply(sse=text_stream(words), chunk_delay=0.05), 30.0, 3, "CANCELLED"),
            "deadline": (Reply(sse=text_stream(words), chunk_delay=0.1), 1.0, None, "DEADLINE_EXCEEDED"),
            "broken": (
                Reply(sse=text_stream(words), chunk_delay=0.02, break_after=4),
                30.0,
                None,
                "UNAVAILABLE",
            ),
        }
        for step, (reply, timeout, reads, code) in cases.items():
            before = request_counts("StreamCreate", f"revchunk-{step}")
            outcome = await run(step, reply, timeout, reads)
            if code == "CANCELLED":
                assert outcome == "cancelled"
            else:
                assert outcome == getattr(grpc.StatusCode, code), (step, outcome)
            assert await counted("StreamCreate", f"revchunk-{step}", before, 1) == {code: 1}, step
    traces = stored_traces(db)
    assert traces["cancel"][0] == "CANCELLED", traces["cancel"]
    assert traces["deadline"][0] == "DEADLINE_EXCEEDED", traces["deadline"]
    assert traces["broken"][0] == "UPSTREAM_UNAVAILABLE", traces["broken"]
