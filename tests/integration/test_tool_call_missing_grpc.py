"""TOOL_CALL_MISSING, extra calls, the retry-once setting and llama.cpp learned from its answers,
through the real gRPC server against the fake OpenAI-compatible upstream (issue 14 review)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core import upstream_kind
from server.core.tool_call_check import DROPPED_KEY
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, tool_call
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

LLAMA = {"Server": "llama.cpp"}


def _fn(name: str) -> chat_pb2.FunctionDefinition:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"q": {"type": "string"}}})
    return chat_pb2.FunctionDefinition(name=name, description=name, parameters=params)


def req(base_url: str, step: str, **fields: Any) -> chat_pb2.CreateRequest:
    return chat_request(
        base_url,
        functions=[_fn("search"), _fn("send_message")],
        trace=chat_pb2.TraceContext(step_id=step),
        **fields,
    )


def stream_req(request: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())


def text_sse(text: str) -> list[dict[str, Any] | str]:
    return [
        chunk({"role": "assistant", "content": text}),
        chunk({}, finish_reason="stop"),
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        },
        "[DONE]",
    ]


def calls_sse(*names: str) -> list[dict[str, Any] | str]:
    events: list[dict[str, Any] | str] = []
    for i, name in enumerate(names):
        call = {
            "index": i,
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": "{}"},
        }
        events.append(chunk({"tool_calls": [call]}))
    return [*events, chunk({}, finish_reason="tool_calls"), "[DONE]"]


@pytest.fixture(autouse=True)
def _nothing_learned() -> None:
    upstream_kind.forget_all()


@pytest.fixture
async def retrying(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), tool_call_missing_retry=True)
    async with running_gateway(settings) as running:
        yield running


async def test_text_under_the_default_required_is_tool_call_missing_unary(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """Functions and no function_call: the gateway sends "required"; a text answer fails."""
    usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    upstream.script(Reply(json_body=completion("I would rather chat.", usage=usage)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(req(upstream.base_url, "m-unary"), timeout=10)
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert "I would rather chat." in d.message
    assert upstream.requests[0].body["tool_choice"] == "required"
    trace = await wait_for_trace(gateway.traces, "m-unary")
    assert trace.error_type == "TOOL_CALL_MISSING"
    assert json.loads(trace.response_json)["choices"][0]["message"]["content"] == "I would rather chat."
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens) == (11, 4)
    assert len(upstream.requests) == 1  # not asked again: the setting is off


async def test_text_under_the_default_required_is_tool_call_missing_stream(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_sse("Just text.")))
    relayed = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gateway.chat.StreamCreate(
            stream_req(req(upstream.base_url, "m-stream")), timeout=10
        ):
            relayed += event.delta.content
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert relayed == "Just text."
    trace = await wait_for_trace(gateway.traces, "m-stream")
    assert trace.error_type == "TOOL_CALL_MISSING" and trace.usage.completion_tokens == 3


async def test_auto_takes_the_text(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("Plain answer.")))
    answer = await gateway.chat.Create(req(upstream.base_url, "auto", function_call="auto"), timeout=10)
    assert answer.completion.choices[0].message.content == "Plain answer."


async def test_vllm_handle_keeps_the_seeds_auto_and_takes_the_text(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """The seed's exception: "auto" is sent to vLLM handles, so no call was required."""
    upstream.script(Reply(json_body=completion("From vLLM.")))
    request = req(upstream.base_url, "vllm")
    request.llm_config.handle = "vllm/qwen"
    answer = await gateway.chat.Create(request, timeout=10)
    assert upstream.requests[0].body["tool_choice"] == "auto"
    assert answer.completion.choices[0].message.content == "From vLLM."


async def test_retry_once_when_configured(retrying: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(json_body=completion("Not yet.")),
        Reply(
            json_body=completion(
                None, tool_calls=[tool_call("search", {"q": "x"})], finish_reason="tool_calls"
            )
        ),
    )
    answer = await retrying.chat.Create(req(upstream.base_url, "again"), timeout=10)
    assert [c.name for c in answer.completion.choices[0].message.tool_calls] == ["search"]
    assert len(upstream.requests) == 2 and upstream.requests[0].body == upstream.requests[1].body


async def test_retry_once_then_fail(retrying: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("No.")), Reply(json_body=completion("Still no.")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrying.chat.Create(req(upstream.base_url, "twice"), timeout=10)
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert "Still no." in d.message and len(upstream.requests) == 2


async def test_stream_is_asked_again_only_when_nothing_was_relayed(
    retrying: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_sse("")), Reply(sse=calls_sse("search")))
    events = [
        e async for e in retrying.chat.StreamCreate(stream_req(req(upstream.base_url, "s-again")), timeout=10)
    ]
    assert [c.name for c in events[-1].completion.choices[0].message.tool_calls] == ["search"]
    assert len(upstream.requests) == 2
    upstream.script(Reply(sse=text_sse("Some text.")), Reply(sse=calls_sse("search")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in retrying.chat.StreamCreate(
            stream_req(req(upstream.base_url, "s-relayed")), timeout=10
        ):
            pass
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert len(upstream.requests) == 3  # the text was relayed: not asked again


async def test_llamacpp_learned_from_its_header_gets_the_forced_call_again_in_its_form(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """A handle that does not name llama.cpp: the named tool_choice goes first; the answer says
    `Server: llama.cpp` and has no call (llama-server ignored the named form), so the call is
    sent once more as the forced function alone with "required" (no setting needed); later
    calls to that base URL go in that form at once."""
    upstream.script(
        Reply(json_body=completion("Ignored it."), headers=LLAMA),
        Reply(
            json_body=completion(None, tool_calls=[tool_call("search", {})], finish_reason="tool_calls"),
            headers=LLAMA,
        ),
    )
    answer = await gateway.chat.Create(req(upstream.base_url, "learn", force_tool_call="search"), timeout=10)
    assert [c.name for c in answer.completion.choices[0].message.tool_calls] == ["search"]
    first, second = (r.body for r in upstream.requests)
    assert first["tool_choice"] == {"type": "function", "function": {"name": "search"}}
    assert second["tool_choice"] == "required" and [t["function"]["name"] for t in second["tools"]] == [
        "search"
    ]
    await gateway.chat.Create(req(upstream.base_url, "learned", force_tool_call="search"), timeout=10)
    assert upstream.requests[2].body["tool_choice"] == "required"


async def test_llamacpp_learned_from_timings_behind_a_proxy(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """A proxy rewrote `Server`; the `timings` object of llama-server's answer still says it."""
    body = completion("Hi.")
    body["timings"] = {"prompt_n": 9, "predicted_n": 2, "predicted_ms": 1.0}
    upstream.script(Reply(json_body=body, headers={"Server": "nginx"}))
    await gateway.chat.Create(req(upstream.base_url, "t", function_call="auto"), timeout=10)
    assert upstream_kind.is_llamacpp(upstream.base_url)


async def test_an_unknown_server_is_not_asked_again(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("Nope.")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(req(upstream.base_url, "unknown", force_tool_call="search"), timeout=10)
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert len(upstream.requests) == 1 and not upstream_kind.is_llamacpp(upstream.base_url)


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_extra_calls_of_a_learned_llamacpp_are_cut_and_traced(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    """parallel_tool_calls: false (the default sent) ignored by llama-server: the first call is
    kept (streamed deltas too), the others are listed in the trace."""
    upstream_kind.learn(upstream.base_url, {"server": "llama.cpp"})  # names as received
    step = f"extra-{rpc}"
    request = req(upstream.base_url, step)
    if rpc == "Create":
        calls = [tool_call("search", {}, "call_a"), tool_call("send_message", {}, "call_b")]
        upstream.script(Reply(json_body=completion(None, tool_calls=calls, finish_reason="tool_calls")))
        completion_ = (await gateway.chat.Create(request, timeout=10)).completion
    else:
        upstream.script(Reply(sse=calls_sse("search", "send_message"), headers=LLAMA))
        events = [e async for e in gateway.chat.StreamCreate(stream_req(request), timeout=10)]
        assert all(call.index == 0 for e in events if e.HasField("delta") for call in e.delta.tool_calls)
        completion_ = events[-1].completion
    assert upstream.requests[0].body["parallel_tool_calls"] is False
    assert [c.name for c in completion_.choices[0].message.tool_calls] == ["search"]
    trace = await wait_for_trace(gateway.traces, step)
    dropped = json.loads(trace.response_json)[DROPPED_KEY]
    assert [d["function"]["name"] for d in dropped] == ["send_message"]


async def test_a_5xx_body_is_kept_in_the_trace_after_the_retries(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """Item 7 of issue 14 for 5xx: the last error body, scrubbed and bounded, as for 4xx."""
    failing = Reply(status=500, json_body={"error": {"message": "tools param requires --jinja flag"}})
    upstream.script(failing, failing, failing)
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.chat.Create(req(upstream.base_url, "five", function_call="auto"), timeout=10)
    trace = await wait_for_trace(gateway.traces, "five")
    kept = json.loads(trace.response_json)
    assert kept["http_status"] == 500 and "requires --jinja" in kept["body"]


async def test_stream_text_read_alone_is_not_asked_again(
    retrying: RunningGateway, upstream: FakeUpstream
) -> None:
    # Paced: each chunk is a read of its own, relayed by the stream loop's one-chunk fast path,
    # which must count its text as relayed (the caller cannot take it back).
    paced = [chunk({"content": "Some text."}), chunk({}, finish_reason="stop"), "[DONE]"]
    upstream.script(Reply(sse=paced, chunk_delay=0.05), Reply(sse=calls_sse("search")))
    seen: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in retrying.chat.StreamCreate(
            stream_req(req(upstream.base_url, "s-paced")), timeout=10
        ):
            seen.append(event.delta.content)
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert "Some text." in seen
    assert len(upstream.requests) == 1  # the text went out: not asked again


async def test_stream_is_asked_again_once_only(retrying: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_sse("")), Reply(sse=text_sse("")), Reply(sse=calls_sse("search")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in retrying.chat.StreamCreate(stream_req(req(upstream.base_url, "s-twice")), timeout=10):
            pass
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING")
    assert len(upstream.requests) == 2  # the second answer without the call is the error
