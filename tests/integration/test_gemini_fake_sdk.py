"""The Gemini fake checked by Google's own SDK (`google-genai`): if the SDK parses what the fake
answers, stream and not, and raises its typed errors for the fake's error bodies, the fake
speaks the real API, and the translator tests that run on the fake's payloads test real shapes.

The SDK talks only to the fake (base_url on loopback); retries are off so each error is one
request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import errors, types

from server.providers import gemini
from tests.fakes.gemini_fake import (
    GeminiFake,
    Reply,
    blocked_prompt,
    error_body,
    function_call,
    invalid_key,
    rate_limited,
    response,
    usage_metadata,
)

# The SDK's async path (aiohttp, installed here as in production) subclasses
# aiohttp.ClientSession, which aiohttp deprecates with this warning on the SDK's first request.
# It is the SDK's own, unavoidable without leaving its default transport; nothing else is ignored.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

SIGNATURE = "c2lnbmF0dXJlLWJ5dGVz"  # base64 of b"signature-bytes"
TOO_LONG = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."


@pytest.fixture
async def fake() -> AsyncIterator[GeminiFake]:
    server = GeminiFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(fake: GeminiFake) -> AsyncIterator[genai.Client]:
    sdk = genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(
            base_url=fake.root_url,
            api_version="v1beta",
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
    try:
        yield sdk
    finally:
        await sdk.aio.aclose()
        sdk.close()


async def test_text_answer_parses_and_the_request_is_recorded(fake: GeminiFake, client: genai.Client) -> None:
    fake.push(Reply(body=response([{"text": "Hi there"}], usage=usage_metadata(10, 3, thoughts=2, cached=4))))

    answer = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="Say hi")

    assert answer.text == "Hi there"
    assert answer.candidates and answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.thoughts_token_count == 2
    assert answer.usage_metadata.cached_content_token_count == 4
    assert answer.response_id == "resp-fake-1"
    (request,) = fake.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == "test-key"
    assert request.json["contents"] == [{"role": "user", "parts": [{"text": "Say hi"}]}]


async def test_function_call_with_thought_signature_parses(fake: GeminiFake, client: genai.Client) -> None:
    parts = [
        {"text": "Let me look.", "thought": True},
        function_call("get_weather", {"city": "Paris"}, signature=SIGNATURE),
    ]
    fake.push(Reply(body=response(parts)))

    answer = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="Weather?")

    assert answer.function_calls is not None
    (call,) = answer.function_calls
    assert (call.name, call.args) == ("get_weather", {"city": "Paris"})
    assert answer.candidates and answer.candidates[0].content and answer.candidates[0].content.parts
    assert answer.candidates[0].content.parts[1].thought_signature == b"signature-bytes"
    assert answer.candidates[0].content.parts[0].thought is True


async def test_blocked_prompt_parses(fake: GeminiFake, client: genai.Client) -> None:
    fake.push(Reply(body=blocked_prompt("PROHIBITED_CONTENT")))

    answer = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")

    assert not answer.candidates
    assert answer.prompt_feedback is not None
    assert answer.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT


async def test_stream_parses_every_event(fake: GeminiFake, client: genai.Client) -> None:
    events = [
        response([{"text": "Thinking...", "thought": True}], finish_reason=None, usage=usage_metadata(8, 0)),
        response([{"text": "Hel"}], finish_reason=None, usage=usage_metadata(8, 1)),
        response([{"text": "lo"}], usage=usage_metadata(8, 2, thoughts=3)),
    ]
    fake.push(Reply(events=events))

    stream = await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi")
    chunks = [chunk async for chunk in stream]

    assert len(chunks) == 3
    assert "".join(c.text or "" for c in chunks[1:]) == "Hello"
    assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.thoughts_token_count == 3
    (request,) = fake.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert request.query == {"alt": "sse"}


async def test_stream_decoder_agrees_with_the_sdk_on_the_same_events(
    fake: GeminiFake, client: genai.Client
) -> None:
    events = [
        response([{"text": "Hi"}], finish_reason=None),
        response([function_call("f", {"a": 1}, signature=SIGNATURE)], usage=usage_metadata(8, 4)),
    ]
    fake.push(Reply(events=events))
    stream = await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi")
    sdk_calls = [call for chunk in [c async for c in stream] for call in chunk.function_calls or ()]

    decoder = gemini.StreamDecoder(model="gemini-2.5-flash")
    chunks = [c for event in events for c in decoder.feed(None, _json(event))] + decoder.finish()

    ours = [tc for c in chunks if c and c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c.name, c.args) for c in sdk_calls] == [("f", {"a": 1})]
    assert [(tc["function"]["name"], tc["function"]["arguments"]) for tc in ours] == [("f", '{"a":1}')]
    assert chunks[-1] is None


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("status", "body", "sdk_error"),
    [
        (400, invalid_key(), errors.ClientError),
        (400, error_body(400, TOO_LONG), errors.ClientError),
        (403, error_body(403, "Method doesn't allow unregistered callers."), errors.ClientError),
        (404, error_body(404, "models/gemini-9 is not found for API version v1beta."), errors.ClientError),
        (429, rate_limited("13s"), errors.ClientError),
        (500, error_body(500, "An internal error has occurred."), errors.ServerError),
        (503, error_body(503, "The model is overloaded. Please try again later."), errors.ServerError),
        (504, error_body(504, "Deadline expired before operation could complete."), errors.ServerError),
    ],
)
async def test_error_bodies_raise_the_sdks_typed_errors(
    fake: GeminiFake,
    client: genai.Client,
    status: int,
    body: dict[str, object],
    sdk_error: type[errors.APIError],
) -> None:
    fake.push(Reply(body=body, status=status))

    with pytest.raises(sdk_error) as raised:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")

    assert raised.value.code == status
    error = body["error"]
    assert isinstance(error, dict)
    assert raised.value.status == error["status"]
    assert raised.value.message == error["message"]
    assert len(fake.requests) == 1
