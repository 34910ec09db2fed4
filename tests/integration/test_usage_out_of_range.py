"""Token counts an int32 field cannot hold, end to end: UNAVAILABLE / UPSTREAM_BAD_RESPONSE for
a hostile or broken upstream, never a crash (INTERNAL), on every path that turns an upstream's
counts into `Usage`: the OpenAI-compatible answer, its stream (translated answers are
shape-checked the same way), and the local servers' counters.

Every count is checked by `check_shape`, but the total the gateway works out when the upstream
sends none (prompt + completion, two counts in range) and `cache_write_tokens` (read for every
provider, checked for none) reached the protobuf field unchecked: protobuf's ValueError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_local_servers import local_request
from tests.local_fakes import Answer, LocalServer

INT32_MAX = 2**31 - 1
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# Usages no Usage message can hold, each with the field the error names.
OUT_OF_RANGE: list[tuple[dict[str, Any], str]] = [
    ({"prompt_tokens": INT32_MAX, "completion_tokens": 1}, "usage.total_tokens"),
    ({"prompt_tokens": INT32_MAX, "completion_tokens": 1, "total_tokens": 0}, "usage.total_tokens"),
    (
        {"prompt_tokens": 1, "completion_tokens": 1, "cache_write_tokens": INT32_MAX + 1},
        "usage.cache_write_tokens",
    ),
    ({"prompt_tokens": 1, "completion_tokens": 1, "cache_write_tokens": "many"}, "usage.cache_write_tokens"),
    ({"prompt_tokens": 1, "completion_tokens": 1, "cache_write_tokens": [1]}, "usage.cache_write_tokens"),
    (
        {"prompt_tokens": 1, "completion_tokens": 1, "cache_write_tokens": 5, "cache_write_1h_tokens": True},
        "usage.cache_write_1h_tokens",
    ),
]


def _assert_bad_usage(err: grpc.aio.AioRpcError, field: str) -> None:
    d = expect(err, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == field


@pytest.mark.parametrize(("usage", "field"), OUT_OF_RANGE)
async def test_a_unary_answer_with_counts_out_of_range_is_a_bad_response(
    gateway: RunningGateway, upstream: FakeUpstream, usage: dict[str, Any], field: str
) -> None:
    upstream.script(Reply(json_body=completion("hi", usage=usage)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    _assert_bad_usage(caught.value, field)


@pytest.mark.parametrize(("usage", "field"), OUT_OF_RANGE)
async def test_a_stream_with_counts_out_of_range_is_a_bad_response(
    gateway: RunningGateway, upstream: FakeUpstream, usage: dict[str, Any], field: str
) -> None:
    events = text_stream(["Hel", "lo"])
    last_chunk = events[-2]
    assert isinstance(last_chunk, dict) and "usage" in last_chunk
    last_chunk["usage"] = usage
    upstream.script(Reply(sse=events))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30):
            pass
    _assert_bad_usage(caught.value, field)


async def test_the_total_at_the_limit_is_kept(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    usage = {"prompt_tokens": INT32_MAX - 1, "completion_tokens": 1, "cache_write_tokens": INT32_MAX}
    upstream.script(Reply(json_body=completion("hi", usage=usage)))
    answer = await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    assert answer.completion.usage.total_tokens == INT32_MAX
    assert answer.completion.usage.cache_write_tokens == INT32_MAX


@pytest.mark.parametrize("kind", ["ollama", "llamacpp", "vllm"])
@pytest.mark.parametrize(
    ("prompt", "completion_tokens"), [(INT32_MAX, 1), (1, INT32_MAX + 1), (INT32_MAX + 1, 1)]
)
async def test_a_local_servers_counts_out_of_range_are_a_bad_response(
    tmp_path: Path, kind: str, prompt: int, completion_tokens: int
) -> None:
    server = LocalServer(kind)
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            for stream in (False, True):
                server.script(Answer(text="hi", prompt_tokens=prompt, completion_tokens=completion_tokens))
                request = local_request(server, functions=[])
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    if stream:
                        async for _ in gw.chat.StreamCreate(request, timeout=30):
                            pass
                    else:
                        await gw.chat.Create(request, timeout=30)
                expect(caught.value, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    finally:
        await server.stop()


async def test_a_local_servers_counts_at_the_limit_are_kept(tmp_path: Path) -> None:
    server = LocalServer("ollama")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            server.script(Answer(text="hi", prompt_tokens=INT32_MAX - 1, completion_tokens=1))
            answer = await gw.chat.Create(local_request(server, functions=[]), timeout=30)
            usage = answer.completion.usage
            assert (usage.prompt_tokens, usage.total_tokens) == (INT32_MAX - 1, INT32_MAX)
    finally:
        await server.stop()


def test_the_cases_name_every_count_the_reader_takes() -> None:
    # The counts `usage_from_json` reads that an upstream's usage can carry.
    fields = {field for _, field in OUT_OF_RANGE}
    assert {"usage.total_tokens", "usage.cache_write_tokens", "usage.cache_write_1h_tokens"} <= fields
    assert chat_pb2.Usage.DESCRIPTOR.fields_by_name["cache_write_1h_tokens"].type == 5  # int32


# -- the counts a failed call keeps on its trace: read back as a Usage message too ----------


async def test_a_missing_calls_counts_too_big_to_add_up_leave_the_trace_readable(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Each count in range (the answer's shape is fine), their sum not: the trace of the
    # TOOL_CALL_MISSING keeps the counts it can read back (GetProviderTrace builds a Usage).
    from tests.integration.test_tool_call_missing_grpc import req
    from tests.trace_polling import wait_for_trace

    usage = {"prompt_tokens": INT32_MAX, "completion_tokens": INT32_MAX, "total_tokens": 5}
    upstream.script(Reply(json_body=completion("no call", usage=usage)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(req(upstream.base_url, "huge-missing"), timeout=10)
    expect(caught.value, UNAVAILABLE, "TOOL_CALL_MISSING")
    trace = await wait_for_trace(gateway.traces, "huge-missing")
    assert trace.error_type == "TOOL_CALL_MISSING"
    assert trace.usage.total_tokens <= INT32_MAX


async def test_a_local_failed_calls_counts_leave_the_trace_readable(tmp_path: Path) -> None:
    from tests.integration.test_local_servers import trace_of

    server = LocalServer("ollama")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            server.script(Answer(text="hi", prompt_tokens=INT32_MAX + 1, completion_tokens=INT32_MAX + 1))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.chat.Create(local_request(server, functions=[], step_id="local-huge"), timeout=30)
            expect(caught.value, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
            trace = await trace_of(gw, "local-huge")
            assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    finally:
        await server.stop()
