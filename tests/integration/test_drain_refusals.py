"""New calls during the drain are refused UNAVAILABLE, never cut with grpc's bare CANCELLED.

grpc's `server.stop()` cancels (a bare CANCELLED, trailers only, grpc/grpc#41785) every call that
reaches the server after the stop began: one still queued for a handler, one whose connection was
accepted just before the listener closed, one sent before its client read the GOAWAY. The
gateway cannot answer those, so it begins the stop only once nothing is coming: after the
signal it refuses every new call (health checks and reflection too) with UNAVAILABLE
SHUTTING_DOWN until none came for 0.1 s. Health checks were neither refused nor counted: they
were answered NOT_SERVING up to the stop, and the ones arriving as it began got CANCELLED (14 of
~80 checks made around the stop, over 5 runs, the flaky
`test_signal_drains_stream_refuses_new_calls_and_exits_zero`).

The callers here behave as a health checker or a retrying client does: a refused caller waits
before it calls again. A caller that never pauses keeps the drain refusing for at most 3 s, and
the call it makes as grpc's stop begins may still get grpc's CANCELLED: that one we cannot answer.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.integration.test_clients import CONNECT_REFUSED, drain_outcome, stream_request
from tests.process_harness import ServerProcess, start_server_process

CALLERS = 6
# A refused caller waits this long before its next call (a retry backoff, a checker's interval):
# longer than the 0.1 s of quiet the drain waits for.
PAUSE_AFTER_REFUSAL = 0.3


async def check(channel: grpc.aio.Channel) -> str:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return f"OK {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"


async def count_tokens(channel: grpc.aio.Channel) -> str:
    request = chat_pb2.CountTokensRequest(  # answered by the gateway itself
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint="https://api.openai.com/v1",
            context_window=8000,
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )
    await chat_pb2_grpc.ChatCompletionServiceStub(channel).CountTokens(request, timeout=5)
    return "OK"


async def reflect(channel: grpc.aio.Channel) -> str:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for _ in stub.ServerReflectionInfo(iter([request]), timeout=5):
        pass
    return "OK"


async def caller(server: ServerProcess, call: object, done: asyncio.Event, seen: Counter[str]) -> None:
    """Fresh-channel calls (a new client each time) until the server is gone."""
    assert callable(call)
    while not done.is_set():
        async with grpc.aio.insecure_channel(server.address) as channel:
            try:
                result = str(await call(channel))
            except grpc.aio.AioRpcError as exc:
                result = drain_outcome(exc)
        seen[f"{call.__name__}: {result}"] += 1
        await asyncio.sleep(PAUSE_AFTER_REFUSAL if result.startswith("UNAVAILABLE") else 0.005)


async def test_calls_made_through_the_drain_are_answered_or_refused_never_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream([f"w{i} " for i in range(12)]), chunk_delay=0.1))
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "10"],
    )
    seen: Counter[str] = Counter()
    done = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                stream_request(upstream.base_url), timeout=30
            )
            await stream.read()  # in flight: the drain lasts while it runs (~1.2 s)
            kinds = [check, check, check, check, count_tokens, reflect][:CALLERS]
            callers = [asyncio.create_task(caller(server, kind, done, seen)) for kind in kinds]
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            while await stream.read() is not grpc.aio.EOF:
                pass
            assert await stream.code() == grpc.StatusCode.OK
            exit_code = await asyncio.to_thread(server.wait, 20)
            await asyncio.sleep(PAUSE_AFTER_REFUSAL + 0.1)  # each caller sees the closed port
            done.set()
            await asyncio.gather(*callers)
    finally:
        done.set()
        server.close()
    assert exit_code == 0, server.log[-2000:]
    assert time.monotonic() - signalled < 10
    allowed = {
        "check: OK SERVING",  # before the signal
        "check: OK NOT_SERVING",  # after it, while the queue settles
        "count_tokens: OK",
        "reflect: OK",
        *(f"{kind}: UNAVAILABLE SHUTTING_DOWN" for kind in ("check", "count_tokens", "reflect")),
        *(f"{kind}: {CONNECT_REFUSED}" for kind in ("check", "count_tokens", "reflect")),
    }
    assert set(seen) <= allowed, f"{seen}\n{server.log[-2000:]}"
    # Every kind was refused by the gateway itself (with its ErrorInfo) before the port closed.
    for kind in ("check", "count_tokens", "reflect"):
        assert seen[f"{kind}: UNAVAILABLE SHUTTING_DOWN"] >= 1, seen
        assert seen[f"{kind}: {CONNECT_REFUSED}"] >= 1, seen
