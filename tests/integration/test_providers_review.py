"""Review of the provider seam (issue 13): attacks on the Anthropic/Gemini paths through the real
gateway in front of the loopback fakes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.store_sqlite import SqliteAuthStore
from server.core.validation import MAX_REQUEST_CHARS, MAX_THINKING_BLOCKS
from tests.fakes import anthropic_fake as fake
from tests.fakes import gemini_fake
from tests.fakes.anthropic_fake import AnthropicFake, Reply
from tests.fakes.gemini_fake import GeminiFake
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import expect

KEY = "sk-ant-api03-" + "r" * 40
USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT


@pytest.fixture
async def anthropic() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gateway(tmp_path: Path, anthropic: AnthropicFake) -> AsyncIterator[RunningGateway]:
    settings = make_settings(
        tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=KEY, max_answer_bytes=1024 * 1024
    )
    async with running_gateway(settings) as running:
        yield running


def request(*messages: chat_pb2.Message) -> chat_pb2.CreateRequest:
    llm = chat_pb2.LLMConfig(model=fake.MODEL, model_endpoint_type="anthropic", context_window=200_000)
    msgs = list(messages) or [chat_pb2.Message(role=USER, content="Say hello")]
    return chat_pb2.CreateRequest(llm_config=llm, messages=msgs)


async def test_a_huge_streamed_signature_is_refused_in_linear_time(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """A thinking block's signature arrives as many signature_delta events and nothing is emitted
    until content_block_stop, so the answer cap cannot see it. The decoder joined it with `+=` on an
    attribute (quadratic: each event copied the whole signature so far, on the event loop) and with
    no bound. An upstream (a tenant's BYOK base URL) could pin the loop for minutes."""
    piece = "s" * 8192
    events = [
        fake.message_start(),
        fake.block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        fake.block_delta(0, {"type": "thinking_delta", "thinking": "hmm"}),
        *(fake.block_delta(0, {"type": "signature_delta", "signature": piece}) for _ in range(6000)),
        fake.block_stop(0),
        *fake.text_events(1, ["Hi"]),
        fake.message_delta("end_turn", 5),
        fake.MESSAGE_STOP,
    ]
    anthropic.script(Reply(sse=events))
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(stream_req, timeout=30):
            assert not event.HasField("completion")
    elapsed = time.monotonic() - started
    d = expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.metadata["provider"] == "anthropic"
    assert elapsed < 8, f"took {elapsed:.1f} s"


async def test_thinking_blocks_count_toward_the_request_size_limit(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """MAX_REQUEST_CHARS bounds all text of a request; a client's thinking_blocks and
    thought_signature (sent upstream as they are) were not counted."""
    anthropic.script(Reply(json_body=fake.message([fake.text_block("ok")])))
    half = MAX_REQUEST_CHARS // 2 + 1
    history = chat_pb2.Message(
        role=ASSISTANT,
        content="",
        thinking_blocks=[chat_pb2.ThinkingBlock(type="thinking", text="t", signature="s" * half)],
        tool_calls=[chat_pb2.ToolCall(id="toolu_1", name="f", arguments="{}", thought_signature="g" * half)],
    )
    req = request(
        chat_pb2.Message(role=USER, content="hi"), history, chat_pb2.Message(role=USER, content="go")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(req, timeout=30)
    expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert anthropic.requests == []


async def test_the_answer_cap_counts_thinking_blocks_and_refusal_in_a_unary_answer(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """The stream counts thinking blocks and refusal against LLMGW_MAX_ANSWER_BYTES; the unary
    answer's size (`answer_bytes`) did not, so the same answer passed the cap unary only."""
    huge = "s" * (1024 * 1024 + 1)
    anthropic.script(Reply(json_body=fake.message([fake.thinking_block("hmm", huge), fake.text_block("Hi")])))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(request(), timeout=30)
    d = expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.metadata["limit_bytes"] == str(1024 * 1024)


async def test_message_stop_with_a_content_block_still_open_is_not_a_complete_answer(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """A tool_use block cut mid-input (no content_block_stop) followed by message_stop must not
    become a completed tool call with half its arguments."""
    events = [
        fake.message_start(),
        fake.block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
        fake.block_delta(0, {"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
        fake.message_delta("tool_use", 5),
        fake.MESSAGE_STOP,
    ]
    anthropic.script(Reply(sse=events))
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(stream_req, timeout=30):
            assert not event.HasField("completion")
    expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiFake]:
    server = GeminiFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gemini_gateway(tmp_path: Path, gemini: GeminiFake) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, google_ai_base_url=gemini.base_url, gemini_api_key="AIza" + "g" * 35)
    async with running_gateway(settings) as running:
        yield running


def gemini_request() -> chat_pb2.CreateRequest:
    llm = chat_pb2.LLMConfig(
        model=gemini_fake.MODEL_VERSION, model_endpoint_type="google_ai", context_window=1_000_000
    )
    return chat_pb2.CreateRequest(llm_config=llm, messages=[chat_pb2.Message(role=USER, content="hi")])


async def test_a_unary_anthropic_answer_with_too_many_tool_calls_is_refused(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """The OpenAI path caps tool calls (check_shape) unary and stream; the Anthropic unary path
    converted any number of tool_use blocks."""
    blocks = [fake.tool_use_block("f", {}, f"toolu_{i}") for i in range(200)]
    anthropic.script(Reply(json_body=fake.message(blocks, stop_reason="tool_use")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(request(), timeout=30)
    d = expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.metadata["provider"] == "anthropic"


async def test_a_unary_gemini_answer_with_too_many_tool_calls_is_refused(
    gemini_gateway: RunningGateway, gemini: GeminiFake
) -> None:
    parts = [gemini_fake.function_call("f", {}) for _ in range(200)]
    gemini.push(gemini_fake.Reply(body=gemini_fake.response(parts)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gemini_gateway.chat.Create(gemini_request(), timeout=30)
    d = expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.metadata["provider"] == "google_ai"


@pytest.mark.parametrize("tokens", [2**40, -5])
async def test_out_of_range_anthropic_usage_is_a_bad_response(
    gateway: RunningGateway, anthropic: AnthropicFake, tokens: int
) -> None:
    """check_shape refuses usage outside int32 on the OpenAI path; the Anthropic path must map it
    to the contract too, not fail in the proto conversion."""
    anthropic.script(Reply(json_body=fake.message(usage_=fake.usage(tokens, 3))))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(request(), timeout=30)
    expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


async def test_out_of_range_usage_in_an_anthropic_stream_is_a_bad_response(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    anthropic.script(
        Reply(sse=[*fake.text_stream(["Hi"])[:-2], fake.message_delta("end_turn", 2**40), fake.MESSAGE_STOP])
    )
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(stream_req, timeout=30):
            assert not event.HasField("completion")
    expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


async def test_a_key_echoed_in_streamed_thinking_is_scrubbed(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    events = [
        fake.message_start(),
        *fake.thinking_events(0, [f"the key is {KEY[:20]}", f"{KEY[20:]} ok"], signature="sig"),
        *fake.text_events(1, [f"also {KEY}"]),
        fake.message_delta("end_turn", 5),
        fake.MESSAGE_STOP,
    ]
    anthropic.script(Reply(sse=events))
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    seen = [event async for event in gateway.chat.StreamCreate(stream_req, timeout=30)]
    assert seen[-1].HasField("completion")
    assert KEY not in str(seen)
    assert KEY[:20] not in str(seen)


async def test_a_key_echoed_in_a_unary_refusal_and_thinking_is_scrubbed(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    content = [fake.thinking_block(f"thinking {KEY}"), fake.text_block(f"no: {KEY}")]
    anthropic.script(Reply(json_body=fake.message(content, stop_reason="refusal")))
    response = await gateway.chat.Create(request(), timeout=30)
    assert KEY not in str(response)


async def test_a_gemini_key_echoed_in_an_error_body_is_scrubbed(
    gemini_gateway: RunningGateway, gemini: GeminiFake
) -> None:
    key = "AIza" + "g" * 35
    body = gemini_fake.error_body(400, f"API key {key} not valid; see ?key={key}")
    gemini.push(gemini_fake.Reply(body=body, status=400))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gemini_gateway.chat.Create(gemini_request(), timeout=30)
    assert key not in str(info.value.trailing_metadata()) and key not in (info.value.details() or "")


async def test_a_byok_anthropic_provider_on_a_loopback_name_is_not_called(
    tmp_path: Path, anthropic: AnthropicFake
) -> None:
    """SSRF: a tenant's BYOK base URL (not operator-listed) on a name resolving to loopback."""
    db = tmp_path / "gateway.db"
    async with SqliteAuthStore(path=str(db)) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    loopback_name = anthropic.base_url.replace("127.0.0.1", "localhost")
    settings = make_settings(
        tmp_path, auth="required", encryption_key="pass-" + "p" * 16, anthropic_api_key=KEY
    )
    async with running_gateway(settings) as gw:
        try:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="team-claude",
                    model_endpoint_type="anthropic",
                    base_url=loopback_name,
                    api_key="byok-" + "b" * 30,
                ),
                metadata=metadata,
                timeout=10,
            )
        except grpc.aio.AioRpcError:
            return  # refused at creation: as good
        llm = chat_pb2.LLMConfig(
            model=fake.MODEL,
            model_endpoint_type="anthropic",
            provider_name="team-claude",
            provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
        )
        req = chat_pb2.CreateRequest(llm_config=llm, messages=[chat_pb2.Message(role=USER, content="hi")])
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(req, metadata=metadata, timeout=10)
    assert anthropic.requests == []


async def test_the_number_of_thinking_blocks_is_bounded(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    """Empty ThinkingBlocks are 2 bytes each: a 64 MiB request carried ~32M of them, each iterated
    (validation, conversion to dicts) on the event loop."""
    history = chat_pb2.Message(role=ASSISTANT, content="x")
    history.thinking_blocks.extend([chat_pb2.ThinkingBlock()] * (MAX_THINKING_BLOCKS + 1))
    req = request(
        chat_pb2.Message(role=USER, content="hi"), history, chat_pb2.Message(role=USER, content="go")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.chat.Create(req, timeout=30)
    d = expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert "messages[1].thinking_blocks" in d.metadata["fields"]
    assert anthropic.requests == []
