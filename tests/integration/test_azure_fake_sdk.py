"""The official `openai` SDK's `AsyncAzureOpenAI` against the Azure fake (its default
deployment URL form with `api-version`, and the v1 form): if the SDK parses the fake's answers,
streams and errors, the fake matches what Azure sends. The SDK talks only to the loopback fake."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from tests.fake_upstream import Reply
from tests.fakes import azure_fake as fake
from tests.fakes.azure_fake import AzureFake

KEY = "azure-key-" + "a" * 22
VERSION = "2024-10-21"


@pytest.fixture
async def server() -> AsyncIterator[AzureFake]:
    running = AzureFake(key=KEY)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client(server: AzureFake) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    sdk = openai.AsyncAzureOpenAI(
        azure_endpoint=server.resource_url, api_key=KEY, api_version=VERSION, max_retries=0
    )
    try:
        yield sdk
    finally:
        await sdk.close()


_MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


async def test_sdk_parses_a_completion_at_the_deployment_url(
    server: AzureFake, client: openai.AsyncAzureOpenAI
) -> None:
    answer = await client.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    assert answer.choices[0].message.content == "Hello!"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens == 15
    (rec,) = server.requests
    assert rec.path == f"/openai/deployments/{fake.DEPLOYMENT}/chat/completions"
    assert server.queries == [f"api-version={VERSION}"]
    assert rec.headers["api-key"] == KEY and "Authorization" not in rec.headers


async def test_sdk_parses_a_stream_with_the_prompt_filter_chunk(
    server: AzureFake, client: openai.AsyncAzureOpenAI
) -> None:
    server.script(Reply(sse=fake.azure_stream(["Hel", "lo"])))
    stream = await client.chat.completions.create(
        model=fake.DEPLOYMENT, messages=_MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices == [] and chunks[0].id == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 27


async def test_sdk_sees_a_filtered_answer(server: AzureFake, client: openai.AsyncAzureOpenAI) -> None:
    server.script(Reply(json_body=fake.azure_completion(None, finish_reason="content_filter")))
    answer = await client.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.choices[0].message.content is None


async def test_sdk_raises_the_errors(server: AzureFake, client: openai.AsyncAzureOpenAI) -> None:
    server.script(fake.content_filter_400(), fake.context_length_400())
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    assert info.value.code == "content_filter"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    assert info.value.code == "context_length_exceeded"
    bad = openai.AsyncAzureOpenAI(
        azure_endpoint=server.resource_url, api_key="wrong", api_version=VERSION, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    await bad.close()


async def test_sdk_at_the_v1_url(server: AzureFake) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=server.v1_base_url, api_key="unused", default_headers={"api-key": KEY}, max_retries=0
    )
    try:
        answer = await sdk.chat.completions.create(model=fake.DEPLOYMENT, messages=_MESSAGES)
    finally:
        await sdk.close()
    assert answer.choices[0].message.content == "Hello!"
    assert server.requests[0].path == "/openai/v1/chat/completions" and server.queries == [""]
    assert server.requests[0].body["model"] == fake.DEPLOYMENT
