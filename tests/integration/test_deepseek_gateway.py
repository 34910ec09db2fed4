"""DeepSeek end to end: the real gateway in front of the OpenAI-compatible fake. Exact path,
headers and body; reasoning_content answered (unary and stream) but never sent back in the
history; strict dropped from tools; cache-hit usage; keys only to their own base URL;
MISSING_API_KEY; a BYOK DeepSeek provider."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.store_sqlite import SqliteAuthStore
from server.providers.registry import provider_for
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, tool_call, usage_chunk
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

KEY = "sk-" + "d" * 32
OPENAI_KEY = "sk-proj-" + "o" * 40
MODEL = "deepseek-reasoner"
USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT
TOOL = chat_pb2.ROLE_TOOL
DEEPSEEK_USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 9,
    "total_tokens": 39,
    "prompt_cache_hit_tokens": 20,
    "prompt_cache_miss_tokens": 10,
    "completion_tokens_details": {"reasoning_tokens": 5},
}


@pytest.fixture
async def deepseek() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config(**fields: Any) -> chat_pb2.LLMConfig:
    values: dict[str, Any] = {"model": MODEL, "model_endpoint_type": "deepseek", "context_window": 64_000}
    values.update(fields)
    return chat_pb2.LLMConfig(**values)


def request(*messages: chat_pb2.Message, **fields: Any) -> chat_pb2.CreateRequest:
    llm = fields.pop("llm_config", None) or config()
    msgs = list(messages) or [chat_pb2.Message(role=USER, content="Say hello")]
    return chat_pb2.CreateRequest(llm_config=llm, messages=msgs, **fields)


def weather_function() -> chat_pb2.FunctionDefinition:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return chat_pb2.FunctionDefinition(name="get_weather", description="Weather", parameters=params)


async def test_reasoning_and_cache_usage_unary_and_stream(tmp_path: Path, deepseek: FakeUpstream) -> None:
    deepseek.script(
        Reply(json_body=completion("Hello!", model=MODEL, reasoning_content="Think.", usage=DEEPSEEK_USAGE)),
        Reply(
            sse=[
                chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
                chunk({"reasoning_content": "Thi"}),
                chunk({"reasoning_content": "nk."}),
                chunk({"content": "Hello!"}),
                chunk({}, finish_reason="stop"),
                {**usage_chunk(30, 9), "usage": DEEPSEEK_USAGE},
                "[DONE]",
            ]
        ),
    )
    settings = make_settings(tmp_path, deepseek_base_url=deepseek.base_url, deepseek_api_key=KEY)
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request(), timeout=10)
        stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
        events = [e async for e in gw.chat.StreamCreate(stream_req, timeout=10)]
    for c in (response.completion, events[-1].completion):
        message = c.choices[0].message
        assert (message.content, message.reasoning_content) == ("Hello!", "Think.")
        assert (c.usage.prompt_tokens, c.usage.cached_tokens, c.usage.reasoning_tokens) == (30, 20, 5)
    for rec in deepseek.requests:
        assert rec.path == "/v1/chat/completions"
        assert rec.headers["Authorization"] == f"Bearer {KEY}"
    assert deepseek.requests[0].body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
    }


async def test_reasoning_content_of_tool_call_turns_is_sent_back_and_tools_are_not_strict(
    tmp_path: Path, deepseek: FakeUpstream
) -> None:
    """DeepSeek's thinking mode: the reasoning_content of a user-to-user segment with tool calls
    goes back (else 400); a segment without tool calls loses it (DeepSeek ignores it there)."""
    settings = make_settings(tmp_path, deepseek_base_url=deepseek.base_url, deepseek_api_key=KEY)
    call = chat_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    history = [
        chat_pb2.Message(role=USER, content="Hi"),
        chat_pb2.Message(role=ASSISTANT, content="Hello.", reasoning_content="A greeting."),
        chat_pb2.Message(role=USER, content="Weather in Paris?"),
        chat_pb2.Message(
            role=ASSISTANT, content="", reasoning_content="I should call it.", tool_calls=[call]
        ),
        chat_pb2.Message(role=TOOL, content="Sunny", tool_call_id="call_1"),
        chat_pb2.Message(role=ASSISTANT, content="It is sunny.", reasoning_content="Easy."),
        chat_pb2.Message(role=USER, content="Thanks"),
    ]
    async with running_gateway(settings) as gw:
        unary = request(*history, functions=[weather_function()], trace=chat_pb2.TraceContext(step_id="ds-1"))
        response = await gw.chat.Create(unary, timeout=10)
        traces = [await wait_for_trace(gw.traces, "ds-1", trace_id=response.provider_trace_id)]
        stream_req = chat_pb2.StreamCreateRequest.FromString(
            request(
                *history, functions=[weather_function()], trace=chat_pb2.TraceContext(step_id="ds-2")
            ).SerializeToString()
        )
        # Functions and no function_call ask for a call ("required"): DeepSeek answers one.
        called = {
            "index": 0,
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
        }
        deepseek.script(
            Reply(sse=[chunk({"tool_calls": [called]}), chunk({}, finish_reason="tool_calls"), "[DONE]"])
        )
        events = [e async for e in gw.chat.StreamCreate(stream_req, timeout=10)]
        traces.append(await wait_for_trace(gw.traces, "ds-2", trace_id=events[-1].provider_trace_id))
    assert len(deepseek.requests) == 2
    for rec in deepseek.requests:
        messages = rec.body["messages"]
        assert messages[1] == {"role": "assistant", "content": "Hello."}  # no tool call: stripped
        assert messages[3] == {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("get_weather", '{"city": "Paris"}')],
            "reasoning_content": "I should call it.",
        }
        assert messages[5] == {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Easy."}
        assert rec.body["tools"] and all("strict" not in t["function"] for t in rec.body["tools"])
    for trace in traces:
        assert list(trace.notes) == ["messages[].reasoning_content", "tools[].function.strict"]


async def test_other_providers_never_get_reasoning_content(tmp_path: Path, deepseek: FakeUpstream) -> None:
    """The same history to an OpenAI-compatible endpoint: reasoning_content is left out (noted)."""
    settings = make_settings(tmp_path, allowed_endpoints=(deepseek.base_url,))
    call = chat_pb2.ToolCall(id="call_1", name="get_weather", arguments="{}")
    history = [
        chat_pb2.Message(role=USER, content="Weather?"),
        chat_pb2.Message(role=ASSISTANT, reasoning_content="I should call it.", tool_calls=[call]),
        chat_pb2.Message(role=TOOL, content="Sunny", tool_call_id="call_1"),
    ]
    llm = chat_pb2.LLMConfig(model="gpt-4o", model_endpoint_type="openai", model_endpoint=deepseek.base_url)
    async with running_gateway(settings) as gw:
        req = request(*history, llm_config=llm, trace=chat_pb2.TraceContext(step_id="oa-1"))
        response = await gw.chat.Create(req, timeout=10)
        trace = await wait_for_trace(gw.traces, "oa-1", trace_id=response.provider_trace_id)
    assert "reasoning_content" not in deepseek.requests[0].raw.decode()
    assert list(trace.notes) == ["messages[].reasoning_content"]


async def test_official_endpoint_without_a_key_is_missing_api_key(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path, openai_api_key=OPENAI_KEY)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.chat.Create(request(), timeout=10)
    d = expect(info.value, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "deepseek_api_key"
    assert "DEEPSEEK_API_KEY" in d.message


async def test_keys_go_only_to_their_own_base_url(tmp_path: Path, deepseek: FakeUpstream) -> None:
    other = FakeUpstream()
    await other.start()
    try:
        settings = make_settings(
            tmp_path,
            deepseek_base_url=deepseek.base_url,
            deepseek_api_key=KEY,
            openai_api_key=OPENAI_KEY,
            allowed_endpoints=(other.base_url,),
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(request(llm_config=config(model_endpoint=other.base_url)), timeout=10)
        (rec,) = other.requests
        assert KEY not in str(rec.headers) and OPENAI_KEY not in str(rec.headers)
        assert not deepseek.requests
    finally:
        await other.stop()


async def test_byok_deepseek_provider(tmp_path: Path, deepseek: FakeUpstream) -> None:
    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    byok_key = "sk-byok-" + secrets.token_hex(24)
    settings = make_settings(
        tmp_path,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(deepseek.base_url,),
        deepseek_api_key=KEY,
    )
    async with running_gateway(settings) as gw:
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="team-ds", model_endpoint_type="deepseek", base_url=deepseek.base_url, api_key=byok_key
            ),
            metadata=metadata,
            timeout=10,
        )
        llm = config(provider_name="team-ds", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK)
        await gw.chat.Create(request(llm_config=llm), metadata=metadata, timeout=10)
    (rec,) = deepseek.requests
    assert rec.headers["Authorization"] == f"Bearer {byok_key}"
    assert KEY not in str(rec.headers)


def test_build_body_keeps_reasoning_only_in_segments_with_tool_calls() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "hi", "reasoning_content": "user text is left alone"},
            {"role": "assistant", "content": "x", "reasoning_content": "r0"},
            {"role": "user", "content": "call it"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r1"},
            {"role": "tool", "content": "ok", "tool_call_id": "c"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r2",
             "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "s"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}],
    }  # fmt: skip
    sent, notes = provider_for("deepseek").build_body(body, stream=False)
    assert sent["messages"] == [
        {"role": "user", "content": "hi", "reasoning_content": "user text is left alone"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r1"},
        {"role": "tool", "content": "ok", "tool_call_id": "c"},
        # The current tool loop (no user message after it yet) keeps it too; Anthropic's blocks go.
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r2"},
    ]
    assert sent["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert notes == ["messages[].reasoning_content", "thinking_blocks", "tools[].function.strict"]
    assert body["messages"][1]["reasoning_content"] == "r0"  # the internal body is not changed
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert provider_for("deepseek").build_body(plain, stream=True) == (plain, [])
    kept = {"model": MODEL, "messages": body["messages"][2:5]}
    assert provider_for("deepseek").build_body(kept, stream=False) == (kept, [])  # nothing to do: no copy
