"""A burst of new calls that the worker cannot start at once waits for it: none is cancelled.

grpc core queues a call it has parsed until the worker's event loop asks for the next one; by
default it drops calls from that queue at random once 1,000 wait (a bare CANCELLED the gateway
never sees). The gateway sets the bound itself (LLMGW_GRPC_MAX_PENDING_CALLS, 10,000) with no
random drops below it. The burst here: the gateway process is stopped (SIGSTOP) while 2,500
calls are sent, then resumed: grpc core parses them all within milliseconds, long before the
loop has started them. With grpc's defaults 427 to 436 of the 2,500 ended CANCELLED (three runs).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.process_harness import async_server_process

CALLS = 2_500
CHANNELS = 10


async def test_a_burst_the_loop_cannot_start_at_once_is_answered_in_full(tmp_path: Path) -> None:
    request = chat_pb2.CountTokensRequest(  # answered by the gateway itself: no upstream needed
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint="https://api.openai.com/v1",
            context_window=8000,
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )
    async with async_server_process(tmp_path) as server:
        # Separate connections, as many clients would open (one connection carries them as well).
        channels = [
            grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 10)
            stubs = [chat_pb2_grpc.ChatCompletionServiceStub(channel) for channel in channels]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                calls = [
                    asyncio.ensure_future(stubs[i % CHANNELS].CountTokens(request, timeout=60))
                    for i in range(CALLS)
                ]
                await asyncio.sleep(1.0)  # every call written to the stopped server's sockets
            finally:
                os.kill(server.pid, signal.SIGCONT)
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for channel in channels:
                await channel.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    codes = {r.code() if isinstance(r, grpc.aio.AioRpcError) else repr(r) for r in failed}
    assert not failed, f"{len(failed)} of {CALLS} calls failed: {codes}"
    assert all(r.total_tokens > 0 for r in results if isinstance(r, chat_pb2.CountTokensResponse))
