"""How a call that ends without a status of the gateway's own is counted in llmgw_requests_total.

A call cut by shutdown, one whose deadline grpc itself enforced and one its caller cancelled all
end in the servicer with a cancellation and no code on the context. Each must count with the
status its caller receives (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED), as server.inflight tells
the cases apart, not all as CANCELLED. A real gateway in-process, a slow loopback upstream, and
the metrics read from the process's exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_hardening_shutdown import error_reason, wait_until

CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN")


def request_counts(rpc: str, model: str, provider: str = "openai") -> dict[str, float]:
    """llmgw_requests_total for (rpc, provider, model), by code, from this process's metrics."""
    counts = dict.fromkeys(CODES, 0.0)
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "llmgw_requests_total"
                and labels.get("rpc") == rpc
                and labels.get("provider") == provider
                and labels.get("model") == model
            ):
                counts[labels["code"]] = counts.get(labels["code"], 0.0) + sample.value
    return counts


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        code: after.get(code, 0.0) - before.get(code, 0.0)
        for code in after
        if after[code] != before.get(code, 0.0)
    }


async def counted(
    rpc: str, model: str, before: dict[str, float], total: int, provider: str = "openai"
) -> dict[str, float]:
    """The counts added since `before`, once `total` calls were counted (at most 10 s)."""
    await wait_until(lambda: sum(grown(before, request_counts(rpc, model, provider)).values()) >= total, 10)
    return grown(before, request_counts(rpc, model, provider))


async def test_calls_cut_by_shutdown_count_as_the_unavailable_their_callers_get(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    model = "lifecycle-shutdown-model"
    upstream.default = Reply(json_body=completion(), delay=30.0)  # far past the grace period
    upstream.script(Reply(sse=text_stream([f"w{i} " for i in range(100)]), chunk_delay=0.3))
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        creates_before = request_counts("Create", model)
        streams_before = request_counts("StreamCreate", model)
        stream = gw.chat.StreamCreate(chat_request(upstream.base_url, model=model), timeout=60)
        first = await stream.read()
        assert first.WhichOneof("event") == "delta"
        create = asyncio.ensure_future(
            gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=60)
        )
        assert await wait_until(lambda: len(upstream.requests) >= 2, 10)  # both held upstream

        await gw.server.stop(grace=0.5)

        async def stream_end() -> object:
            while (event := await stream.read()) is not grpc.aio.EOF:
                assert event.WhichOneof("event") == "delta"  # cut: never a completion
            return event

        outcomes = await asyncio.gather(create, stream_end(), return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, (outcome.code(), outcome.details())
            assert error_reason(outcome) == "SHUTTING_DOWN"
        # What the callers got is what the metric says (it said CANCELLED for both).
        assert await counted("Create", model, creates_before, 1) == {"UNAVAILABLE": 1}
        assert await counted("StreamCreate", model, streams_before, 1) == {"UNAVAILABLE": 1}


async def test_calls_ended_by_grpcs_deadline_count_deadline_exceeded(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # A caller that stops reading its stream: once grpc's flow-control window is full the
    # handler waits in grpc's write, not on the upstream, so the gateway's own deadline (which
    # bounds its reads from the upstream) never ends it. grpc's deadline does: the handler is
    # cancelled with no status of ours set. The caller sees DEADLINE_EXCEEDED; the metric said
    # CANCELLED. A Create whose upstream never answers is ended by the gateway's deadline (its
    # own DEADLINE_EXCEEDED status) instead: counted the same.
    model = "lifecycle-deadline-model"
    count = 4
    big = ["x" * 16384 for _ in range(400)]  # 6.5 MB a stream: far more than grpc buffers
    upstream.script(*(Reply(sse=text_stream(big)) for _ in range(count)))
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        streams_before = request_counts("StreamCreate", model)

        async def read_slowly() -> object:
            request = chat_pb2.StreamCreateRequest.FromString(
                chat_request(upstream.base_url, model=model).SerializeToString()
            )
            call = gw.chat.StreamCreate(request, timeout=1.0)
            first = await call.read()
            assert first.WhichOneof("event") == "delta"
            await asyncio.sleep(1.5)  # reads nothing until its deadline is past
            try:
                while (event := await call.read()) is not grpc.aio.EOF:
                    assert event.WhichOneof("event") == "delta"
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return "ended OK"

        codes = await asyncio.gather(*(read_slowly() for _ in range(count)))
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * count
        assert await counted("StreamCreate", model, streams_before, count) == {"DEADLINE_EXCEEDED": count}

        upstream.default = Reply(json_body=completion(), delay=30.0)
        creates_before = request_counts("Create", model)
        creates = [
            gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=0.6) for _ in range(count)
        ]
        for outcome in await asyncio.gather(*creates, return_exceptions=True):
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (outcome.code(), outcome.details())
        assert await counted("Create", model, creates_before, count) == {"DEADLINE_EXCEEDED": count}


async def test_a_call_its_caller_cancels_still_counts_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    model = "lifecycle-cancel-model"
    upstream.default = Reply(json_body=completion(), delay=30.0)
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        before = request_counts("Create", model)
        call = gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=60)
        assert await wait_until(lambda: len(upstream.requests) >= 1, 10)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert await counted("Create", model, before, 1) == {"CANCELLED": 1}


async def test_calls_refused_during_the_drain_count_unavailable(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # A call that reaches a handler once the drain refuses new ones is answered UNAVAILABLE
    # SHUTTING_DOWN before the servicer parses it: it counts like any refused call (empty
    # provider and model), not nowhere (the metric missed every refusal of a rollout).
    upstream.default = Reply(json_body=completion())
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        before = {
            rpc: request_counts(rpc, "", provider="") for rpc in ("Create", "StreamCreate", "CountTokens")
        }
        running = gw.server._running  # noqa: SLF001 - the drain's refusal, without a burst of calls
        assert running is not None
        running.calls.refuse_new()
        request = chat_request(upstream.base_url, model="lifecycle-refused-model")
        outcomes = await asyncio.gather(
            gw.chat.Create(request, timeout=10),
            gw.chat.CountTokens(request, timeout=10),
            return_exceptions=True,
        )
        stream = gw.chat.StreamCreate(
            chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()), timeout=10
        )
        try:
            await stream.read()
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc)
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, (outcome.code(), outcome.details())
            assert error_reason(outcome) == "SHUTTING_DOWN"
        assert len(outcomes) == 3
        assert not upstream.requests  # refused before any work
        for rpc, counts in before.items():
            assert await counted(rpc, "", counts, 1, provider="") == {"UNAVAILABLE": 1}, rpc


async def test_a_stream_marked_cut_whose_deadline_ends_it_counts_deadline_exceeded(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # A slow-reading stream is in grpc's write when the grace period ends: the cut can only mark
    # it (it would end before its next message), and the write never returns. Its deadline then
    # passes before grpc's own stop cancels what is left (CUT_ALLOWANCE later): grpc ends it, the
    # caller sees DEADLINE_EXCEEDED. Shutdown did not end it; the metric said UNAVAILABLE.
    model = "lifecycle-marked-deadline-model"
    upstream.script(Reply(sse=text_stream(["x" * 16384 for _ in range(400)])))  # 6.5 MB
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        before = request_counts("StreamCreate", model)
        request = chat_pb2.StreamCreateRequest.FromString(
            chat_request(upstream.base_url, model=model).SerializeToString()
        )
        # The cut comes about 1 s in (0.5 s, settling, the 0.5 s grace), grpc's own cancel about
        # 3 s in (CUT_ALLOWANCE 2 s later): the 2 s deadline falls between them.
        call = gw.chat.StreamCreate(request, timeout=2.0)
        first = await call.read()
        assert first.WhichOneof("event") == "delta"
        await asyncio.sleep(0.5)  # grpc's window fills: the handler waits in its write
        stopping = asyncio.ensure_future(gw.server.stop(grace=0.5))
        await asyncio.sleep(2.5)  # reads nothing until its deadline is past
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while (event := await call.read()) is not grpc.aio.EOF:
                assert event.WhichOneof("event") == "delta"
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
        await stopping
        assert await counted("StreamCreate", model, before, 1) == {"DEADLINE_EXCEEDED": 1}
