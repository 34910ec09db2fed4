"""Issue 12 items 8 and 13 end to end: LLMGW_MAX_ANSWER_BYTES ends a too-big answer (streamed or
unary, OpenAI-compatible or local) with UNAVAILABLE / UPSTREAM_BAD_RESPONSE and a failed trace;
an answer with 100,000 choices is refused instead of relayed; a caller can ask for a final
completion without the text the deltas carried (what a default client needs past 4 MiB)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream, tool_call, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_local_servers import local_request, trace_of
from tests.local_fakes import Answer, LocalServer

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
CAP = 64 * 1024


@pytest.fixture
async def capped(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), max_answer_bytes=CAP)
    async with running_gateway(settings) as running:
        yield running


async def _stream(
    gw: RunningGateway, request: chat_pb2.CreateRequest
) -> tuple[list[chat_pb2.StreamCreateResponse], grpc.aio.AioRpcError | None]:
    events: list[chat_pb2.StreamCreateResponse] = []
    try:
        async for event in gw.chat.StreamCreate(request, timeout=30):
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def _assert_over_cap(err: grpc.aio.AioRpcError | None, provider: str) -> None:
    assert err is not None
    d = expect(err, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    info = d.error_infos[0]
    assert info.metadata["provider"] == provider
    assert info.metadata["limit_bytes"] == str(CAP)
    assert int(info.metadata["answer_bytes"]) > CAP
    assert "LLMGW_MAX_ANSWER_BYTES" in d.message


async def test_a_stream_over_the_answer_cap_fails_and_is_traced_as_failed(
    capped: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=text_stream(["x" * 1024] * 100)))
    request = chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="cap-stream"))
    events, err = await _stream(capped, request)
    _assert_over_cap(err, "openai")
    assert not [e for e in events if e.WhichOneof("event") == "completion"]
    relayed = sum(len(e.delta.content) for e in events)
    assert relayed <= CAP  # nothing past the cap was relayed
    trace = await trace_of(capped, "cap-stream")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    assert "LLMGW_MAX_ANSWER_BYTES" in trace.error_message


async def test_a_paced_stream_over_the_cap_relays_nothing_past_it(
    capped: RunningGateway, upstream: FakeUpstream
) -> None:
    # Each piece a read of its own (the stream loop's one-chunk fast path): the cap is checked
    # before the piece is relayed there too.
    upstream.script(Reply(sse=text_stream(["x" * 1024] * 70), chunk_delay=0.003))
    request = chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="cap-paced"))
    events, err = await _stream(capped, request)
    _assert_over_cap(err, "openai")
    assert sum(len(e.delta.content) for e in events) == CAP  # 64 pieces, not the 65th
    trace = await trace_of(capped, "cap-paced")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"
    assert len(json.loads(trace.response_json)["choices"][0]["message"]["content"]) == CAP


async def test_tool_call_arguments_count_against_the_cap(
    capped: RunningGateway, upstream: FakeUpstream
) -> None:
    fragments = [
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]})
    ]
    fragments += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": "a" * 4096}}]})] * 20
    upstream.script(Reply(sse=[*fragments, chunk({}, finish_reason="tool_calls"), "[DONE]"]))
    _, err = await _stream(capped, chat_request(upstream.base_url))
    _assert_over_cap(err, "openai")


async def test_a_unary_answer_over_the_cap_fails_and_is_traced_as_failed(
    capped: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body=completion("y" * (CAP + 1))))
    request = chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="cap-unary"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await capped.chat.Create(request, timeout=30)
    _assert_over_cap(caught.value, "openai")
    trace = await trace_of(capped, "cap-unary")
    assert trace.error_type == "UPSTREAM_BAD_RESPONSE"


async def test_an_answer_at_the_cap_passes(capped: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("y" * CAP)))
    answer = await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
    assert len(answer.completion.choices[0].message.content) == CAP


def _body_of(size: int, content: str) -> bytes:
    """An OpenAI answer of exactly `size` bytes whose content is `content` (padded with an
    unknown field: its bytes are in the body, not in the answer's counted text)."""
    body = completion(content)
    body["x_padding"] = ""
    raw = json.dumps(body, separators=(",", ":")).encode()
    body["x_padding"] = "p" * (size - len(raw))
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


@pytest.mark.parametrize("over", [0, 1])
async def test_a_body_at_or_just_over_the_cap_passes_when_its_text_is_under(
    capped: RunningGateway, upstream: FakeUpstream, over: int
) -> None:
    # At the cap the body proves the text is under it (no walk); one byte over, the walk does.
    upstream.script(Reply(raw=_body_of(CAP + over, "y" * (CAP - 1000)), content_type="application/json"))
    answer = await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
    assert len(answer.completion.choices[0].message.content) == CAP - 1000


async def test_only_a_body_over_the_cap_is_walked(
    capped: RunningGateway, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.gateway

    walked: list[int] = []
    counted = server.gateway.answer_bytes

    def answer_bytes(answer: dict[str, Any]) -> int:
        walked.append(size := counted(answer))
        return size

    monkeypatch.setattr(server.gateway, "answer_bytes", answer_bytes)
    for size, text in ((CAP, "y" * 100), (CAP + 1, "y" * 100)):
        upstream.script(Reply(raw=_body_of(size, text), content_type="application/json"))
        await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
    assert walked == [100]  # the second body only


@pytest.mark.parametrize(("text", "fails"), [("\n" * CAP, False), ("é" * (CAP // 2) + "\n", True)])
async def test_escapes_count_as_the_text_they_decode_to(
    capped: RunningGateway, upstream: FakeUpstream, text: str, fails: bool
) -> None:
    # The body is over the cap either way (each \n is 2 bytes there, each é 6 as \u00e9): the
    # decoded text decides, CAP bytes passing, CAP + 1 failing.
    raw = json.dumps(completion(text)).encode()
    assert len(raw) > CAP
    upstream.script(Reply(raw=raw, content_type="application/json"))
    if not fails:
        answer = await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
        assert answer.completion.choices[0].message.content == text
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
    _assert_over_cap(caught.value, "openai")
    assert caught.value.trailing_metadata() is not None
    d = expect(caught.value, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["answer_bytes"] == str(CAP + 1)


async def test_a_translated_answer_over_the_cap_fails_though_its_body_is_under(tmp_path: Path) -> None:
    # Anthropic's thinking is both the reasoning and a thinking block of the translated answer:
    # counted twice, 0.6 of the cap in the body is 1.2 of it in the answer. The size of the body
    # proves nothing for a translated answer: it is walked.
    from tests.fakes import anthropic_fake as fake

    server = fake.AnthropicFake()
    await server.start()
    try:
        settings = make_settings(
            tmp_path,
            anthropic_base_url=server.base_url,
            anthropic_api_key="sk-ant-test",
            max_answer_bytes=CAP,
        )
        thinking = "t" * (CAP * 6 // 10)
        body = fake.message([fake.thinking_block(thinking), fake.text_block("ok")])
        assert len(json.dumps(body)) < CAP
        server.script(fake.Reply(json_body=body))
        config = chat_pb2.LLMConfig(model=fake.MODEL, model_endpoint_type="anthropic", context_window=200_000)
        request = chat_pb2.CreateRequest(
            llm_config=config, messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Think")]
        )
        async with running_gateway(settings) as running:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await running.chat.Create(request, timeout=30)
        _assert_over_cap(caught.value, "anthropic")
        d = expect(caught.value, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
        # The thinking twice, the text, and the block's other strings ("thinking", its signature).
        counted = 2 * len(thinking) + len("ok") + len("thinking") + len("EqQBCgIYAhIM1gbcDa9GJwZA2b3h")
        assert d.error_infos[0].metadata["answer_bytes"] == str(counted)
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", ["ollama", "vllm"])
async def test_a_local_answer_over_the_cap_fails_streamed_and_unary(tmp_path: Path, kind: str) -> None:
    server = LocalServer(kind)
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,), max_answer_bytes=CAP)
        async with running_gateway(settings) as gw:
            big = "z" * (CAP + 100)
            server.script(Answer(text=big, chunks=[big[i : i + 1000] for i in range(0, len(big), 1000)]))
            request = local_request(server, functions=[], step_id=f"local-{kind}")
            events, err = await _stream(gw, request)
            _assert_over_cap(err, kind)
            assert sum(len(e.delta.content) for e in events) <= CAP
            assert (await trace_of(gw, f"local-{kind}")).error_type == "UPSTREAM_BAD_RESPONSE"

            server.script(Answer(text=big))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.chat.Create(local_request(server, functions=[]), timeout=30)
            _assert_over_cap(caught.value, kind)
    finally:
        await server.stop()


async def test_a_chunk_with_100000_choices_is_refused_not_relayed(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    many = chunk({"content": "x"})
    many["choices"] = [{"index": i, "delta": {"content": "x"}, "finish_reason": None} for i in range(100_000)]
    upstream.script(Reply(sse=[chunk({"content": "first"}), many, "[DONE]"]))
    events, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is not None
    d = expect(err, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["limit"] == "16"
    assert len(events) <= 1


async def test_choices_spread_over_chunks_are_bounded_too(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=[chunk({"content": "x"}, index=i % 16) for i in range(40)] + ["[DONE]"]))
    events, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is None and events[-1].WhichOneof("event") == "completion"
    assert len(events[-1].completion.choices) == 16
    upstream.script(Reply(sse=[chunk({"content": "x"}, index=i) for i in range(17)] + ["[DONE]"]))
    _, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is not None
    expect(err, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


async def test_a_huge_tool_call_index_is_refused(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    bad = chunk({"tool_calls": [{"index": 10**9, "id": "c", "function": {"name": "f", "arguments": "{}"}}]})
    upstream.script(Reply(sse=[bad, "[DONE]"]))
    _, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is not None
    d = expect(err, UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == "choices[0].delta.tool_calls[0].index"


# -- the final completion without the deltas' text ---------------------------------------------


def _final(events: list[chat_pb2.StreamCreateResponse]) -> chat_pb2.ChatCompletion:
    finals = [e.completion for e in events if e.WhichOneof("event") == "completion"]
    assert len(finals) == 1
    return finals[0]


async def test_final_completion_without_deltas_leaves_out_what_the_deltas_carried(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    call = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    sse: list[dict[str, object] | str] = [
        chunk({"role": "assistant", "reasoning_content": "think "}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"tool_calls": call}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(),
        "[DONE]",
    ]
    upstream.script(Reply(sse=sse), Reply(sse=sse))
    request = chat_request(upstream.base_url, final_completion_without_deltas=True)
    events, err = await _stream(gateway, request)
    assert err is None, err
    final = _final(events)
    message = final.choices[0].message
    assert (message.content, message.reasoning_content) == ("", "")
    assert [(t.id, t.name, t.arguments) for t in message.tool_calls] == [("call_1", "f", "")]
    assert (
        final.usage.total_tokens == 27 and final.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    )
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert "".join(d.content for d in deltas) == "Hello"
    assert "".join(d.reasoning_content for d in deltas) == "think "
    assert "".join(t.arguments for d in deltas for t in d.tool_calls) == '{"a": 1}'

    # Without the option the final completion carries everything, as before.
    events, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is None, err
    message = _final(events).choices[0].message
    assert (message.content, message.reasoning_content) == ("Hello", "think ")
    assert message.tool_calls[0].arguments == '{"a": 1}'


async def test_unpacked_inner_thoughts_stay_in_the_final_completion(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    arguments = json.dumps({"thinking": "I should greet.", "message": "hi"})
    sse: list[dict[str, object] | str] = [
        chunk({"role": "assistant", "tool_calls": [{"index": 0, **tool_call("send_message", "")}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        chunk({}, finish_reason="tool_calls"),
        "[DONE]",
    ]
    upstream.script(Reply(sse=sse))
    config = chat_pb2.LLMConfig(
        model="gpt-4o-mini",
        model_endpoint_type="openai",
        model_endpoint=upstream.base_url,
        context_window=128_000,
        put_inner_thoughts_in_kwargs=True,
    )
    request = chat_request(upstream.base_url, llm_config=config, final_completion_without_deltas=True)
    events, err = await _stream(gateway, request)
    assert err is None, err
    message = _final(events).choices[0].message
    # The gateway changed both (thoughts moved out of the arguments): the deltas did not carry these.
    assert message.content == "I should greet."
    assert json.loads(message.tool_calls[0].arguments) == {"message": "hi"}


async def test_a_default_client_gets_a_big_answers_final_completion_only_without_the_deltas_text(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    words = ["w" * 4096] * 1280  # 5 MiB: over the 4 MiB a default gRPC client accepts per message
    upstream.script(Reply(sse=text_stream(words)), Reply(sse=text_stream(words)))
    events, err = await _stream(gateway, chat_request(upstream.base_url))
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the client's own limit
    events, err = await _stream(
        gateway, chat_request(upstream.base_url, final_completion_without_deltas=True)
    )
    assert err is None, err
    assert _final(events).choices[0].message.content == ""
    assert sum(len(e.delta.content) for e in events) == 5 * 1024 * 1024
