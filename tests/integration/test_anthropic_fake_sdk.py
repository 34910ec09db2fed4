"""The official `anthropic` SDK against the fake Messages API: if the SDK parses the fake's
answers, streams and errors as the real API's, the fake (and the translator tests built on its
payloads) match what Anthropic sends. The SDK talks only to the loopback fake."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import pytest

from tests.fakes import anthropic_fake as fake
from tests.fakes.anthropic_fake import AnthropicFake, Reply, error_reply


@pytest.fixture
async def server() -> AsyncIterator[AnthropicFake]:
    running = AnthropicFake()
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client(server: AnthropicFake) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # No SDK retries: each scripted reply is answered once and each error surfaces as it is.
    sdk = anthropic.AsyncAnthropic(base_url=server.root_url, api_key="test", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


_ASK = {"model": fake.MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "Hi"}]}


async def test_sdk_parses_a_message_with_every_block_type(
    server: AnthropicFake, client: anthropic.AsyncAnthropic
) -> None:
    content = [
        fake.thinking_block("I should check the weather."),
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
        fake.text_block("Let me look."),
        fake.tool_use_block("get_weather", {"location": "Paris"}),
    ]
    body = fake.message(
        content, stop_reason="tool_use", usage_=fake.usage(10, 20, cache_read=5, cache_write=3)
    )
    server.script(Reply(json_body=body))

    answer = await client.messages.create(**_ASK)  # type: ignore[call-overload]

    assert [b.type for b in answer.content] == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert answer.content[0].signature == "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"
    assert answer.content[3].input == {"location": "Paris"}
    assert answer.stop_reason == "tool_use"
    assert answer.usage.cache_read_input_tokens == 5 and answer.usage.cache_creation_input_tokens == 3
    sent = server.requests[0]
    assert sent.path == "/v1/messages"
    # SDK 2.x sends its key as a Bearer token; the translator sends the documented x-api-key.
    assert sent.headers["authorization"] == "Bearer test"
    assert sent.headers["anthropic-version"]  # the SDK's own API version, newer than ours


async def test_sdk_accumulates_the_thinking_and_two_tools_stream(
    server: AnthropicFake, client: anthropic.AsyncAnthropic
) -> None:
    server.script(Reply(sse=fake.thinking_tools_stream()))

    async with client.messages.stream(**_ASK) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_message()

    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    thinking = final.content[0]
    assert thinking.thinking == "Let me think about the weather."  # type: ignore[union-attr]
    assert thinking.signature == "EqQBCgIYAhIM1gbcDa9GJwZA"  # type: ignore[union-attr]
    assert final.content[2].input == {"location": "Paris"}  # type: ignore[union-attr]
    assert final.content[3].input == {"tz": "CET"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (472, 89)
    assert final.usage.cache_read_input_tokens == 100
    assert server.requests[0].body["stream"] is True


async def test_sdk_raw_events_of_a_text_stream_skip_pings(
    server: AnthropicFake, client: anthropic.AsyncAnthropic
) -> None:
    server.script(Reply(sse=fake.text_stream(["Hello", " world"])))

    events = await client.messages.create(**_ASK, stream=True)  # type: ignore[call-overload]
    kinds = [event.type async for event in events]

    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_encoded_sse_is_the_documented_framing() -> None:
    raw = fake.encode_sse([fake.PING, fake.MESSAGE_STOP])
    assert (
        raw == b'event: ping\ndata: {"type":"ping"}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


@pytest.mark.parametrize(
    ("reply", "error_class", "error_type"),
    [
        (error_reply(400, "invalid_request_error", "prompt is too long: 209353 tokens > 200000 maximum"),
         anthropic.BadRequestError, "invalid_request_error"),
        (error_reply(401, "authentication_error", "invalid x-api-key"),
         anthropic.AuthenticationError, "authentication_error"),
        (error_reply(403, "permission_error", "Your API key does not have permission"),
         anthropic.PermissionDeniedError, "permission_error"),
        (error_reply(404, "not_found_error", "model: claude-nope"),
         anthropic.NotFoundError, "not_found_error"),
        (error_reply(413, "request_too_large", "Request exceeds the maximum allowed number of bytes."),
         anthropic.APIStatusError, "request_too_large"),
        (error_reply(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit.",
                     fake.RATE_LIMIT_HEADERS), anthropic.RateLimitError, "rate_limit_error"),
        (error_reply(500, "api_error", "Internal server error"), anthropic.InternalServerError, "api_error"),
        (error_reply(529, "overloaded_error", "Overloaded"), anthropic.OverloadedError, "overloaded_error"),
    ],
)  # fmt: skip
async def test_sdk_raises_its_typed_error_for_each_error_body(
    server: AnthropicFake,
    client: anthropic.AsyncAnthropic,
    reply: Reply,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    server.script(reply)

    with pytest.raises(error_class) as raised:
        await client.messages.create(**_ASK)  # type: ignore[call-overload]

    assert raised.value.status_code == reply.status
    assert raised.value.type == error_type
    assert raised.value.request_id == fake.REQUEST_ID
    if reply.status == 429:
        assert raised.value.response.headers["retry-after"] == "7"
        assert raised.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"


async def test_sdk_raises_for_an_error_event_after_a_200(
    server: AnthropicFake, client: anthropic.AsyncAnthropic
) -> None:
    error = ("error", fake.error_body("overloaded_error", "Overloaded"))
    server.script(Reply(sse=[fake.message_start(), fake.PING, *fake.text_events(0, ["Hel"]), error]))

    events = await client.messages.create(**_ASK, stream=True)  # type: ignore[call-overload]
    with pytest.raises(anthropic.APIStatusError) as raised:
        async for _ in events:
            pass

    assert raised.value.type == "overloaded_error"
    assert json.loads(json.dumps(raised.value.body))["error"]["message"] == "Overloaded"
