"""Traces say why a call ended: the caller's deadline, the caller cancelling, or an upstream that
answered HTTP 200 with an `error` object (as the caller's status says, never "HTTP 500")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, chat_pb2_grpc, traces_pb2

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_hardening_shutdown import error_reason, stored_traces, wait_until
from tests.integration.test_security_e2e import error_info
from tests.process_harness import async_server_process
from tests.trace_polling import wait_for_trace


def traced(upstream: FakeUpstream, step: str) -> chat_pb2.CreateRequest:
    return chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id=step))


def as_stream(request: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())


async def trace_of(gw: RunningGateway, step: str) -> traces_pb2.ProviderTrace:
    return await wait_for_trace(gw.traces, step)


async def test_deadline_and_cancel_are_traced_distinctly_by_the_real_server(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The issue's run: `llm-gateway serve` as a subprocess, so grpc's own cancellation at the
    deadline races the gateway's timeout as it does in production (uvloop)."""
    count = 6
    slow_stream = Reply(sse=text_stream([f"w{i} " for i in range(100)]), chunk_delay=0.1)
    db = tmp_path / "gateway.db"
    async with async_server_process(
        tmp_path, allowed_endpoints=(upstream.base_url,), sqlite_path=db
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            codes: list[grpc.StatusCode] = []
            for i in range(count):
                upstream.script(Reply(hang=True))
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await chat.Create(traced(upstream, f"deadline-create-{i}"), timeout=0.3 + 0.05 * i)
                codes.append(failed.value.code())
                upstream.script(slow_stream)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for _ in chat.StreamCreate(
                        as_stream(traced(upstream, f"deadline-stream-{i}")), timeout=0.5 + 0.05 * i
                    ):
                        pass
                codes.append(failed.value.code())
            assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
            upstream.script(Reply(hang=True), slow_stream)
            upstream.arrived.clear()
            call = chat.Create(traced(upstream, "cancel-create"), timeout=30)
            await asyncio.wait_for(upstream.arrived.wait(), 5)
            call.cancel()
            stream = chat.StreamCreate(as_stream(traced(upstream, "cancel-stream")), timeout=30)
            await stream.read()
            stream.cancel()
            steps = [f"deadline-{kind}-{i}" for i in range(count) for kind in ("create", "stream")]
            steps += ["cancel-create", "cancel-stream"]
            assert await wait_until(lambda: len(stored_traces(db)) >= len(steps), 10), stored_traces(db)
    traces = stored_traces(db)
    for step in steps:
        error_type, message = traces[step]
        expected = "CANCELLED" if step.startswith("cancel") else "DEADLINE_EXCEEDED"
        assert error_type == expected, (step, error_type, message)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_a_200_with_an_error_code_says_200_in_status_and_trace(
    gateway: RunningGateway, upstream: FakeUpstream, stream: bool
) -> None:
    # OpenRouter's shape: HTTP 200, the provider's failure as an error object with a code.
    body = {"error": {"code": 502, "message": "provider returned error"}}
    upstream.default = Reply(json_body=body)
    step = f"body-error-{stream}"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        if stream:
            async for _ in gateway.chat.StreamCreate(as_stream(traced(upstream, step)), timeout=10):
                pass
        else:
            await gateway.chat.Create(traced(upstream, step), timeout=10)
    error = failed.value
    # A 502 in the body means what a 502 means: transient, retried, then UPSTREAM_UNAVAILABLE.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert info.reason == "UPSTREAM_UNAVAILABLE"
    assert info.metadata["http_status"] == "200" and info.metadata["upstream_code"] == "502", info.metadata
    assert "HTTP 200" in (error.details() or "") and "HTTP 502" not in (error.details() or ""), (
        error.details()
    )
    assert len(upstream.requests) == gateway.settings.retry.max_attempts
    trace = await trace_of(gateway, step)
    assert (trace.error_type, trace.error_message) == (info.reason, error.details())


async def test_a_200_with_an_error_without_code_is_a_bad_response(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.default = Reply(json_body={"error": {"message": "something odd"}})
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await gateway.chat.Create(traced(upstream, "body-error-nocode"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(failed.value) == "UPSTREAM_BAD_RESPONSE"
    trace = await trace_of(gateway, "body-error-nocode")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
