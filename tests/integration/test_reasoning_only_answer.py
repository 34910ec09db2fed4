"""An answer of only reasoning, marked complete, through the real gRPC server: UNAVAILABLE /
UPSTREAM_BAD_RESPONSE with `cause: reasoning_only`, the reasoning and the token counts kept in
the trace (server.core.reasoning_only). Loopback upstreams answer as DeepSeek-reasoner
(`reasoning_content`, content "" or null), vLLM (`reasoning`) and Anthropic (a thinking block
alone) do; reasoning with content, an answer cut at max_tokens and a missing required call
keep their own outcomes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion
from tests.fakes import anthropic_fake as afake
from tests.fakes.anthropic_fake import AnthropicFake
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import Details, expect
from tests.trace_polling import wait_for_trace

DEEPSEEK_KEY = "sk-" + "d" * 32
ANTHROPIC_KEY = "sk-ant-api03-" + "k" * 40
THOUGHT = "The user said hello. I should greet them back warmly, in one short sentence."
USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 41,
    "total_tokens": 71,
    "completion_tokens_details": {"reasoning_tokens": 41},
}


def usage_event(usage: dict[str, Any] = USAGE) -> dict[str, Any]:
    return {"id": "chatcmpl-stream1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def reasoning_sse(
    key: str, *, content: str | None = None, finish: str = "stop"
) -> list[dict[str, Any] | str]:
    """DeepSeek-reasoner's stream shape (`key` "reasoning_content"), or vLLM's ("reasoning")."""
    half = len(THOUGHT) // 2
    events: list[dict[str, Any] | str] = [
        chunk({"role": "assistant", "content": None, key: ""}),
        chunk({key: THOUGHT[:half]}),
        chunk({key: THOUGHT[half:]}),
    ]
    if content is not None:
        events.append(chunk({"content": content}))
    return [*events, chunk({"content": ""}, finish_reason=finish), usage_event(), "[DONE]"]


def vllm_completion(content: str | None, *, finish: str = "stop") -> dict[str, Any]:
    body = completion(content, model="Qwen/Qwen3-8B", usage=USAGE, finish_reason=finish)
    body["choices"][0]["message"]["reasoning"] = THOUGHT
    return body


def vllm_request(step: str, **fields: Any) -> Any:
    def build(base_url: str) -> chat_pb2.CreateRequest:
        return chat_request(
            base_url, model="Qwen/Qwen3-8B", trace=chat_pb2.TraceContext(step_id=step), **fields
        )

    return build


def deepseek_request(step: str) -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(
        model="deepseek-reasoner", model_endpoint_type="deepseek", context_window=64_000
    )
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Say hello")],
        trace=chat_pb2.TraceContext(step_id=step),
    )


def streamed(request: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())


async def fails_unary(gw: RunningGateway, request: chat_pb2.CreateRequest) -> Details:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.chat.Create(request, timeout=10)
    return expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


async def fails_stream(gw: RunningGateway, request: chat_pb2.CreateRequest) -> tuple[Details, str, str]:
    """The error, and the reasoning and content the deltas relayed before it."""
    reasoning = content = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gw.chat.StreamCreate(streamed(request), timeout=10):
            assert not event.HasField("completion")  # the error comes in place of the final completion
            reasoning += event.delta.reasoning_content
            content += event.delta.content
    return expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE"), reasoning, content


def assert_reasoning_only(d: Details, provider: str) -> None:
    assert d.metadata["cause"] == "reasoning_only"
    assert d.metadata["reasoning_chars"] == str(len(THOUGHT))
    assert d.metadata["provider"] == provider and d.metadata["finish_reason"] == "stop"
    assert "only reasoning" in d.message


@pytest.fixture
async def deepseek_gw(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, deepseek_base_url=upstream.base_url, deepseek_api_key=DEEPSEEK_KEY)
    async with running_gateway(settings) as running:
        yield running


# -- DeepSeek-reasoner: reasoning_content, content "" (unary) or null then "" (stream) ----------


async def test_deepseek_reasoning_only_unary(deepseek_gw: RunningGateway, upstream: FakeUpstream) -> None:
    body = completion("", model="deepseek-reasoner", reasoning_content=THOUGHT, usage=USAGE)
    upstream.script(Reply(json_body=body))
    d = await fails_unary(deepseek_gw, deepseek_request("ds-unary"))
    assert_reasoning_only(d, "deepseek")
    assert THOUGHT not in d.message
    assert len(upstream.requests) == 1  # not retried: the same model thinks the same again
    trace = await wait_for_trace(deepseek_gw.traces, "ds-unary")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    assert json.loads(trace.response_json)["choices"][0]["message"]["reasoning_content"] == THOUGHT
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens) == (30, 41)


async def test_deepseek_reasoning_only_stream(deepseek_gw: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=reasoning_sse("reasoning_content")))
    d, reasoning, content = await fails_stream(deepseek_gw, deepseek_request("ds-stream"))
    assert_reasoning_only(d, "deepseek")
    assert (reasoning, content) == (THOUGHT, "")  # relayed as it came, as before a TOOL_CALL_MISSING
    trace = await wait_for_trace(deepseek_gw.traces, "ds-stream")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    assert json.loads(trace.response_json)["choices"][0]["message"]["reasoning_content"] == THOUGHT
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens) == (30, 41)


# -- vLLM (and OpenRouter): `reasoning`, content null --------------------------------------------


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_vllm_reasoning_only(gateway: RunningGateway, upstream: FakeUpstream, rpc: str) -> None:
    step = f"vllm-{rpc}"
    request = vllm_request(step)(upstream.base_url)
    if rpc == "Create":
        upstream.script(Reply(json_body=vllm_completion(None)))
        d = await fails_unary(gateway, request)
    else:
        upstream.script(Reply(sse=reasoning_sse("reasoning")))
        d, reasoning, _ = await fails_stream(gateway, request)
        assert reasoning == THOUGHT
    assert_reasoning_only(d, "openai")
    trace = await wait_for_trace(gateway.traces, step)
    message = json.loads(trace.response_json)["choices"][0]["message"]
    assert THOUGHT in (message.get("reasoning"), message.get("reasoning_content"))
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens) == (30, 41)


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_reasoning_with_content_stays_ok(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    request = vllm_request(f"ok-{rpc}")(upstream.base_url)
    if rpc == "Create":
        upstream.script(Reply(json_body=vllm_completion("Hello there!")))
        result = (await gateway.chat.Create(request, timeout=10)).completion
    else:
        upstream.script(Reply(sse=reasoning_sse("reasoning", content="Hello there!")))
        events = [e async for e in gateway.chat.StreamCreate(streamed(request), timeout=10)]
        result = events[-1].completion
    message = result.choices[0].message
    assert (message.content, message.reasoning_content) == ("Hello there!", THOUGHT)
    assert result.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_reasoning_cut_at_max_tokens_is_length_not_an_error(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    request = vllm_request(f"len-{rpc}")(upstream.base_url)
    if rpc == "Create":
        upstream.script(Reply(json_body=vllm_completion(None, finish="length")))
        result = (await gateway.chat.Create(request, timeout=10)).completion
    else:
        upstream.script(Reply(sse=reasoning_sse("reasoning", finish="length")))
        events = [e async for e in gateway.chat.StreamCreate(streamed(request), timeout=10)]
        result = events[-1].completion
    assert result.choices[0].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert result.choices[0].message.reasoning_content == THOUGHT


async def test_a_missing_required_call_is_tool_call_missing_first(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"q": {"type": "string"}}})
    search = chat_pb2.FunctionDefinition(name="search", description="search", parameters=params)
    upstream.script(Reply(json_body=vllm_completion(None)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(vllm_request("tcm", functions=[search])(upstream.base_url), timeout=10)
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")


# -- Anthropic: a thinking block alone, end_turn ------------------------------------------------


@pytest.fixture
async def anthropic() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def anthropic_gw(tmp_path: Path, anthropic: AnthropicFake) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=ANTHROPIC_KEY)
    async with running_gateway(settings) as running:
        yield running


def anthropic_request(step: str) -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(model=afake.MODEL, model_endpoint_type="anthropic", context_window=200_000)
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Say hello")],
        trace=chat_pb2.TraceContext(step_id=step),
    )


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_anthropic_thinking_only(
    anthropic_gw: RunningGateway, anthropic: AnthropicFake, rpc: str
) -> None:
    step = f"anthropic-{rpc}"
    if rpc == "Create":
        body = afake.message([afake.thinking_block(THOUGHT)], usage_=afake.usage(25, 41))
        anthropic.script(afake.Reply(json_body=body))
        d = await fails_unary(anthropic_gw, anthropic_request(step))
    else:
        half = len(THOUGHT) // 2
        events = [
            afake.message_start(25),
            *afake.thinking_events(0, [THOUGHT[:half], THOUGHT[half:]], "EqQBCgIYAhIM"),
            afake.message_delta("end_turn", 41),
            afake.MESSAGE_STOP,
        ]
        anthropic.script(afake.Reply(sse=events))
        d, reasoning, _ = await fails_stream(anthropic_gw, anthropic_request(step))
        assert reasoning == THOUGHT
    assert_reasoning_only(d, "anthropic")
    trace = await wait_for_trace(anthropic_gw.traces, step)
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    assert THOUGHT in trace.response_json
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens) == (25, 41)
