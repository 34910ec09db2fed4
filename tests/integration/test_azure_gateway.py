"""Azure OpenAI end to end: the real gateway in front of the Azure fake (tests/fakes/azure_fake.py).
Both URL forms (exact path, query, headers, body), api-version default and setting, content
filter (answer and 400), context length, keys only to their own base URL, MISSING_API_KEY without
a base URL or key, a BYOK Azure provider, and the settings' names."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.store_sqlite import SqliteAuthStore
from server.config import load_settings
from server.providers.azure import AzureProvider, is_v1
from tests.fake_upstream import FakeUpstream, Reply
from tests.fakes import azure_fake as fake
from tests.fakes.azure_fake import AzureFake
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

KEY = "azure-" + "z" * 26
OPENAI_KEY = "sk-proj-" + "o" * 40
DEPLOYMENT = fake.DEPLOYMENT
USER = chat_pb2.ROLE_USER


@pytest.fixture
async def azure() -> AsyncIterator[AzureFake]:
    server = AzureFake(key=KEY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config(**fields: Any) -> chat_pb2.LLMConfig:
    values: dict[str, Any] = {"model": DEPLOYMENT, "model_endpoint_type": "azure", "context_window": 128_000}
    values.update(fields)
    return chat_pb2.LLMConfig(**values)


def request(*messages: chat_pb2.Message, **fields: Any) -> chat_pb2.CreateRequest:
    llm = fields.pop("llm_config", None) or config()
    msgs = list(messages) or [chat_pb2.Message(role=USER, content="Say hello")]
    return chat_pb2.CreateRequest(llm_config=llm, messages=msgs, **fields)


def stream_request(req: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())


async def fail(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


def test_url_forms() -> None:
    provider = AzureProvider()
    assert provider.endpoint_url("https://res.openai.azure.com", "my dep", stream=False) == (
        "https://res.openai.azure.com/openai/deployments/my%20dep/chat/completions?api-version=2024-10-21"
    )
    assert AzureProvider("2025-01-01-preview").endpoint_url(
        "https://res.openai.azure.com/openai", "d", stream=True
    ) == ("https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=2025-01-01-preview")
    assert provider.endpoint_url("https://res.openai.azure.com/openai/v1", "d", stream=False) == (
        "https://res.openai.azure.com/openai/v1/chat/completions"
    )
    assert is_v1("https://res.openai.azure.com/openai/v1/") and not is_v1("https://res.openai.azure.com/v1")
    assert provider.auth_headers("k") == {"api-key": "k"}


def test_settings_names() -> None:
    settings = load_settings(
        environ={
            "AZURE_BASE_URL": "https://res.openai.azure.com",
            "AZURE_API_VERSION": "2025-01-01-preview",
            "AZURE_API_KEY": KEY,
        }
    )
    assert (settings.azure_base_url, settings.azure_api_version, settings.azure_api_key) == (
        "https://res.openai.azure.com",
        "2025-01-01-preview",
        KEY,
    )
    assert KEY in settings.secrets()
    assert "https://res.openai.azure.com" in settings.provider_base_urls()
    assert KEY not in repr(settings)
    default = load_settings(environ={})
    assert default.azure_api_version == "2024-10-21"
    assert "" not in default.provider_base_urls()
    flagged = load_settings(
        environ={"AZURE_BASE_URL": "https://a.example", "LLMGW_AZURE_BASE_URL": "https://b.example"}
    )
    assert flagged.azure_base_url == "https://b.example"


async def test_deployment_form_unary_and_stream(tmp_path: Path, azure: AzureFake) -> None:
    azure.script(
        Reply(json_body=fake.azure_completion("Hi there")), Reply(sse=fake.azure_stream(["Hi", " there"]))
    )
    settings = make_settings(
        tmp_path, azure_base_url=azure.resource_url, azure_api_key=KEY, openai_api_key=OPENAI_KEY
    )
    trace = chat_pb2.TraceContext(step_id="step-azure")
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request(trace=trace), timeout=10)
        events = [e async for e in gw.chat.StreamCreate(stream_request(request()), timeout=10)]
        stored = await wait_for_trace(gw.traces, "step-azure", trace_id=response.provider_trace_id)
    assert stored.provider == "azure" and not stored.is_byok
    assert KEY not in stored.request_json + stored.response_json
    assert response.completion.choices[0].message.content == "Hi there"
    assert response.completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    final = events[-1].completion
    assert final.choices[0].message.content == "Hi there" and final.usage.total_tokens == 27
    assert azure.queries == ["api-version=2024-10-21"] * 2
    unary, streamed = azure.requests
    for rec in (unary, streamed):
        assert rec.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
        assert rec.headers["api-key"] == KEY
        assert "Authorization" not in rec.headers and OPENAI_KEY not in str(rec.headers)
    assert unary.body == {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "Say hello"}]}
    assert streamed.body["stream"] is True


async def test_v1_form_and_api_version_setting(tmp_path: Path, azure: AzureFake) -> None:
    settings = make_settings(tmp_path, azure_base_url=azure.v1_base_url, azure_api_key=KEY)
    async with running_gateway(settings) as gw:
        await gw.chat.Create(request(), timeout=10)
    assert azure.requests[0].path == "/openai/v1/chat/completions" and azure.queries == [""]
    assert azure.requests[0].body["model"] == DEPLOYMENT
    settings = make_settings(
        tmp_path, azure_base_url=azure.resource_url, azure_api_key=KEY, azure_api_version="2025-01-01-preview"
    )
    async with running_gateway(settings) as gw:
        await gw.chat.Create(request(), timeout=10)
    assert azure.queries[-1] == "api-version=2025-01-01-preview"


async def test_filtered_answer_is_content_filter_unary_and_stream(tmp_path: Path, azure: AzureFake) -> None:
    azure.script(
        Reply(json_body=fake.azure_completion(None, finish_reason="content_filter")),
        Reply(sse=fake.azure_stream(["Once"], finish_reason="content_filter")),
    )
    settings = make_settings(tmp_path, azure_base_url=azure.resource_url, azure_api_key=KEY)
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request(), timeout=10)
        events = [e async for e in gw.chat.StreamCreate(stream_request(request()), timeout=10)]
    assert response.completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert events[-1].completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert events[-1].completion.choices[0].message.content == "Once"


async def test_prompt_filter_and_context_length_errors(tmp_path: Path, azure: AzureFake) -> None:
    azure.script(fake.content_filter_400(), fake.context_length_400(), fake.context_length_400())
    settings = make_settings(tmp_path, azure_base_url=azure.resource_url, azure_api_key=KEY)
    async with running_gateway(settings) as gw:
        filtered = await fail(gw.chat.Create(request(), timeout=10))
        too_long = await fail(gw.chat.Create(request(), timeout=10))
        stream_err = await fail(_drain(gw.chat.StreamCreate(stream_request(request()), timeout=10)))
    d = expect(filtered, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED")
    assert d.metadata["upstream_code"] == "content_filter"
    assert d.metadata["content_filter"] == "jailbreak,violence"
    assert "content filter" in d.message
    for err in (too_long, stream_err):
        d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED")
        assert d.metadata["upstream_code"] == "context_length_exceeded" and d.metadata["provider"] == "azure"
    assert len(azure.requests) == 3  # not retried


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_missing_base_url_or_key(tmp_path: Path, azure: AzureFake) -> None:
    async with running_gateway(make_settings(tmp_path, openai_api_key=OPENAI_KEY)) as gw:
        err = await fail(gw.chat.Create(request(), timeout=10))
    d = expect(err, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "azure_base_url,azure_api_key"
    assert "AZURE_BASE_URL" in d.message and "AZURE_API_KEY" in d.message
    async with running_gateway(make_settings(tmp_path, azure_base_url=azure.resource_url)) as gw:
        err = await fail(gw.chat.Create(request(), timeout=10))
    d = expect(err, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "azure_api_key"
    assert not azure.requests


async def test_key_goes_only_to_its_own_base_url(tmp_path: Path, azure: AzureFake) -> None:
    other = AzureFake()
    await other.start()
    try:
        settings = make_settings(
            tmp_path,
            azure_base_url=azure.resource_url,
            azure_api_key=KEY,
            openai_api_key=OPENAI_KEY,
            allowed_endpoints=(other.resource_url,),
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(request(llm_config=config(model_endpoint=other.resource_url)), timeout=10)
        (rec,) = other.requests
        assert rec.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
        assert rec.headers["api-key"] != KEY and OPENAI_KEY not in str(rec.headers)
        assert not azure.requests
    finally:
        await other.stop()


async def test_byok_azure_provider(tmp_path: Path, azure: AzureFake) -> None:
    byok_key = "byok-" + secrets.token_hex(24)
    team = AzureFake(key=byok_key)
    await team.start()
    try:
        async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
            _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
        metadata = (("authorization", f"Bearer {admin}"),)
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="pass-" + secrets.token_hex(8),
            allowed_endpoints=(team.resource_url,),
            azure_base_url=azure.resource_url,
            azure_api_key=KEY,
        )
        async with running_gateway(settings) as gw:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="team-azure",
                    model_endpoint_type="azure",
                    base_url=team.v1_base_url,
                    api_key=byok_key,
                ),
                metadata=metadata,
                timeout=10,
            )
            llm = config(provider_name="team-azure", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK)
            response = await gw.chat.Create(request(llm_config=llm), metadata=metadata, timeout=10)
        assert response.completion.choices[0].message.content == "Hello!"
        (rec,) = team.requests
        assert rec.path == "/openai/v1/chat/completions" and team.queries == [""]
        assert rec.headers["api-key"] == byok_key and KEY not in str(rec.headers)
        assert not azure.requests
    finally:
        await team.stop()


async def test_other_providers_are_unchanged_by_azure_settings(tmp_path: Path, azure: AzureFake) -> None:
    openai_fake = FakeUpstream()
    await openai_fake.start()
    try:
        settings = make_settings(
            tmp_path,
            azure_base_url=azure.resource_url,
            azure_api_key=KEY,
            openai_base_url=openai_fake.base_url,
            openai_api_key=OPENAI_KEY,
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(request(llm_config=config(model_endpoint_type="openai")), timeout=10)
        (rec,) = openai_fake.requests
        assert rec.headers["Authorization"] == f"Bearer {OPENAI_KEY}" and KEY not in str(rec.headers)
    finally:
        await openai_fake.stop()


@pytest.mark.parametrize("endpoint_type", ["azure", "groq", "deepseek"])
async def test_count_tokens_needs_no_key_nor_base_url(tmp_path: Path, endpoint_type: str) -> None:
    llm = config(
        model="gpt-4o" if endpoint_type == "azure" else "some-model", model_endpoint_type=endpoint_type
    )
    async with running_gateway(make_settings(tmp_path)) as gw:
        counted = await gw.chat.CountTokens(
            chat_pb2.CountTokensRequest.FromString(request(llm_config=llm).SerializeToString()), timeout=10
        )
    assert counted.prompt_tokens > 0 and counted.encoding
    assert counted.total_tokens == counted.prompt_tokens + counted.function_tokens
