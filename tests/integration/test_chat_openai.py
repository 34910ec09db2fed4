"""Create and StreamCreate against a fake OpenAI-compatible upstream (real HTTP on loopback)."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream, tool_call, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request


async def test_create_returns_typed_completion(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("Hello there", reasoning_content="The user greets me.")))
    response = await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)

    sent = upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert not sent.body.get("stream")
    c = response.completion
    assert c.id == "chatcmpl-abc123"
    assert c.model == "gpt-4o-mini-2024-07-18"
    assert c.created == 1732000000
    assert c.system_fingerprint == "fp_test"
    assert c.choices[0].message.role == chat_pb2.ROLE_ASSISTANT
    assert c.choices[0].message.content == "Hello there"
    assert c.choices[0].message.reasoning_content == "The user greets me."
    assert c.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (12, 3, 15)
    assert (c.usage.cached_tokens, c.usage.reasoning_tokens) == (4, 1)
    assert response.provider_trace_id.startswith("provider_trace-")


async def test_create_sends_every_role_tools_and_options(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(
            json_body=completion(
                None, tool_calls=[tool_call("get_weather", {"city": "Paris"})], finish_reason="tool_calls"
            )
        )
    )
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint=upstream.base_url,
            context_window=128000,
            temperature=0.3,
            max_tokens=256,
        ),
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are helpful."),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Weather in Paris?", name="alice"),
            chat_pb2.Message(
                role=chat_pb2.ROLE_ASSISTANT,
                tool_calls=[chat_pb2.ToolCall(id="call_0", name="get_weather", arguments='{"city": "Lyon"}')],
            ),
            chat_pb2.Message(role=chat_pb2.ROLE_TOOL, content='{"temp": 21}', tool_call_id="call_0"),
        ],
        functions=[chat_pb2.FunctionDefinition(name="get_weather", description="Weather", parameters=params)],
    )
    response = await gateway.chat.Create(request, timeout=10)

    body = upstream.requests[0].body
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]
    assert body["messages"][1]["name"] == "alice"
    assert body["messages"][2]["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
        }
    ]
    assert body["messages"][3] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_0"}
    assert body["tools"][0]["type"] == "function"
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tool_choice"] == "required"
    assert body["temperature"] == 0.3
    assert body["max_completion_tokens"] == 256
    message = response.completion.choices[0].message
    assert message.tool_calls[0].name == "get_weather"
    assert json.loads(message.tool_calls[0].arguments) == {"city": "Paris"}
    assert response.completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS


async def test_stream_relays_deltas_then_one_completion(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream(["Hel", "lo", " world"])))
    events = [e async for e in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10)]

    sent = upstream.requests[0].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert "".join(d.content for d in deltas) == "Hello world"
    assert deltas[-1].finish_reason == chat_pb2.FINISH_REASON_STOP
    completions = [e for e in events if e.HasField("completion")]
    assert len(completions) == 1 and events[-1] is completions[0]
    final = completions[0]
    assert final.completion.choices[0].message.content == "Hello world"
    assert final.completion.usage.total_tokens == 27
    assert final.provider_trace_id.startswith("provider_trace-")


async def test_stream_merges_tool_call_fragments_and_reasoning(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    events = [
        chunk({"role": "assistant", "content": None, "reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "send_message", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"mess'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "search", "arguments": '{"q":'},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'age": "hi"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ' "x"}'}}]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(30, 12),
        "[DONE]",
    ]
    upstream.script(Reply(sse=events))
    out = [e async for e in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10)]

    fragments = [t for e in out if e.HasField("delta") for t in e.delta.tool_calls]
    # Fragments that arrived in one network read may be relayed merged (an argument piece onto
    # the fragment it continues): the interleaving of calls and what each index adds up to stay.
    indexes = [f.index for f in fragments]
    assert [i for n, i in enumerate(indexes) if n == 0 or indexes[n - 1] != i] == [0, 1, 0, 1]
    relayed: dict[int, tuple[str, str, str]] = {}
    for f in fragments:
        call_id, name, arguments = relayed.get(f.index, ("", "", ""))
        relayed[f.index] = (call_id + f.id, name + f.name, arguments + f.arguments)
    assert relayed == {
        0: ("call_a", "send_message", '{"message": "hi"}'),
        1: ("call_b", "search", '{"q": "x"}'),
    }
    final = out[-1].completion.choices[0]
    assert final.message.reasoning_content == "Thinking."
    assert [(t.id, t.name, t.arguments) for t in final.message.tool_calls] == [
        ("call_a", "send_message", '{"message": "hi"}'),
        ("call_b", "search", '{"q": "x"}'),
    ]
    assert final.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert out[-1].completion.usage.prompt_tokens == 30


@pytest.mark.parametrize(
    "raw",
    [
        # OpenRouter: processing comments before and between chunks.
        b": OPENROUTER PROCESSING\n\n",
        # vLLM / DeepSeek: keep-alive comments and CRLF line endings.
        b": keep-alive\r\n\r\n",
    ],
)
async def test_stream_skips_keepalives_and_blank_lines(
    gateway: RunningGateway, upstream: FakeUpstream, raw: bytes
) -> None:
    body = raw
    for event in text_stream(["a", "b"], usage=False):
        data = event if isinstance(event, str) else json.dumps(event)
        body += b"\n" + raw + f"data: {data}\r\n\r\n".encode()
    upstream.script(Reply(sse_raw=body, sse=[]))
    out = [e async for e in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10)]
    assert out[-1].completion.choices[0].message.content == "ab"
    # No usage chunk: counted locally rather than left empty.
    assert out[-1].completion.usage.completion_tokens > 0


async def test_stream_without_done_but_finished_is_complete(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream(["x"])[:-1]))  # some servers close without [DONE]
    out = [e async for e in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10)]
    assert out[-1].completion.choices[0].message.content == "x"


async def test_truncated_stream_ends_unavailable(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_stream(["a", "b", "c"]), break_after=3))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=10):
            received.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not any(e.HasField("completion") for e in received)


async def test_unimplemented_rpc_is_unimplemented(gateway: RunningGateway) -> None:
    method = gateway.channel.unary_unary("/llmgateway.v1.ChatCompletionService/Nope")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
