"""Review of issue 12 items 7, 8 and 13 (streams) end to end: a real gateway, real loopback
upstreams, real gRPC clients."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_local_servers import local_request, trace_of
from tests.local_fakes import Answer, LocalServer


async def test_a_final_message_the_client_refuses_is_not_traced_as_a_success(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # 5 MiB: the final completion repeats it, over the 4 MiB a default client accepts. The server's
    # send of that message fails (the client resets the stream); the trace said success anyway,
    # because `yield last` ran after the trace was recorded.
    upstream.script(Reply(sse=text_stream(["w" * 4096] * 1280)))
    request = chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="refused-final"))
    err = None
    try:
        async for _ in gateway.chat.StreamCreate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as exc:
        err = exc
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trace = await trace_of(gateway, "refused-final")
    assert trace.error_type != "", "the refused final message was traced as a success"
    assert trace.error_type == "CANCELLED"  # the client reset the stream when it saw the size


async def test_a_local_final_message_the_client_refuses_is_not_traced_as_a_success(tmp_path: Path) -> None:
    server = LocalServer("ollama")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            big = "z" * (5 * 1024 * 1024)
            server.script(Answer(text=big, chunks=[big[i : i + 65536] for i in range(0, len(big), 65536)]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in gw.chat.StreamCreate(
                    local_request(server, functions=[], step_id="local-refused"), timeout=30
                ):
                    pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trace = await trace_of(gw, "local-refused")
            assert trace.error_type == "CANCELLED", "the refused final message was traced as a success"
    finally:
        await server.stop()
