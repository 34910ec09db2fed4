"""`--workers 2`: one admin listener (worker 0) whose /metrics sums both real worker processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
from llmgateway.v1 import chat_pb2_grpc

from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import chat_request
from tests.integration.test_admin_metrics import Samples, delta, scrape, value
from tests.process_harness import async_server_process
from tests.trace_services import free_port

CALLS = 24


async def _first_scrape(port: int) -> Samples:
    """The server is ready when one worker answers gRPC: worker 0's admin listener may still be
    starting when worker 1 answered first."""
    deadline = time.monotonic() + 15.0
    while True:
        try:
            return await scrape(port)
        except aiohttp.ClientConnectorError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_one_scrape_sees_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    admin_port = free_port()
    async with async_server_process(
        tmp_path,
        listen=f"127.0.0.1:{free_port()}",
        allowed_endpoints=(upstream.base_url,),
        extra_args=["--workers", "2"],
        env={"LLMGW_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
    ) as server:
        before = await _first_scrape(admin_port)
        # A fresh connection per call: SO_REUSEPORT spreads them over both workers (all 24 on
        # one worker has a chance of 2**-23).
        for _ in range(CALLS):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                await stub.Create(chat_request(upstream.base_url, model="workers-model"), timeout=10)
        # Each worker flushes its counts to the shared files once a second: wait for both flushes
        # (worker 0's own counts are flushed by the scrape itself).
        labels = {"rpc": "Create", "provider": "openai", "model": "workers-model", "code": "OK"}
        deadline = time.monotonic() + 15.0
        after = await scrape(admin_port)
        while delta(before, after, "llmgw_requests_total", **labels) < CALLS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = await scrape(admin_port)
        assert server.log.count("admin listener (metrics and console) on") == 1  # worker 0 only
    assert delta(before, after, "llmgw_requests_total", **labels) == CALLS
    genai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "workers-model",
    }
    assert (
        delta(before, after, "gen_ai_client_operation_duration_seconds_count", error_type="", **genai)
        == CALLS
    )
    assert len(upstream.requests) == CALLS
    assert value(after, "llmgw_in_flight", kind="unary") == 0
