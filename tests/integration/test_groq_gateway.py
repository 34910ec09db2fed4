"""Groq end to end: the real gateway in front of the OpenAI-compatible fake, mounted at Groq's
`/openai/v1` path. Exact path, headers and body; the fields Groq refuses dropped; keys only to
their own base URL; MISSING_API_KEY; a BYOK Groq provider."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.store_sqlite import SqliteAuthStore
from server.providers.registry import provider_for
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect

KEY = "gsk_" + "g" * 52
OPENAI_KEY = "sk-proj-" + "o" * 40
MODEL = "llama-3.3-70b-versatile"
USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT


class GroqFake(FakeUpstream):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openai/v1"


@pytest.fixture
async def groq() -> AsyncIterator[GroqFake]:
    server = GroqFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config(**fields: Any) -> chat_pb2.LLMConfig:
    values: dict[str, Any] = {"model": MODEL, "model_endpoint_type": "groq", "context_window": 128_000}
    values.update(fields)
    return chat_pb2.LLMConfig(**values)


def request(*messages: chat_pb2.Message, **fields: Any) -> chat_pb2.CreateRequest:
    llm = fields.pop("llm_config", None) or config()
    msgs = list(messages) or [chat_pb2.Message(role=USER, content="Say hello")]
    return chat_pb2.CreateRequest(llm_config=llm, messages=msgs, **fields)


def test_build_body_drops_what_groq_refuses() -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "hi", "name": "alice"},
            {"role": "assistant", "content": "x"},
        ],
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"1": 2},
        "n": 2,
        "max_completion_tokens": 10,
    }
    sent, notes = provider_for("groq").build_body(body, stream=False)
    assert sent == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
        "max_completion_tokens": 10,
    }
    assert notes == ["logprobs", "logit_bias", "top_logprobs", "n", "messages[].name"]
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1}
    assert provider_for("groq").build_body(plain, stream=True) == (plain, [])


async def test_create_and_stream_exact_request(tmp_path: Path, groq: GroqFake) -> None:
    groq.script(
        Reply(json_body=completion("Hi there", model=MODEL)),
        Reply(sse=text_stream(["Hi", " there"])),
    )
    settings = make_settings(
        tmp_path, groq_base_url=groq.base_url, groq_api_key=KEY, openai_api_key=OPENAI_KEY
    )
    named = chat_pb2.Message(role=USER, content="Say hello", name="alice")
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request(named), timeout=10)
        stream_req = chat_pb2.StreamCreateRequest.FromString(request(named).SerializeToString())
        events = [e async for e in gw.chat.StreamCreate(stream_req, timeout=10)]
    assert response.completion.choices[0].message.content == "Hi there"
    assert events[-1].completion.choices[0].message.content == "Hi there"
    unary, streamed = groq.requests
    for rec in (unary, streamed):
        assert rec.path == "/openai/v1/chat/completions"
        assert rec.headers["Authorization"] == f"Bearer {KEY}"
        assert OPENAI_KEY not in str(rec.headers)
        assert rec.body["messages"] == [{"role": "user", "content": "Say hello"}]
        assert rec.body["model"] == MODEL
    assert unary.body == {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
    assert streamed.body["stream"] is True


async def test_official_endpoint_without_a_key_is_missing_api_key(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path, openai_api_key=OPENAI_KEY)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.chat.Create(request(), timeout=10)
    d = expect(info.value, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "groq_api_key"
    assert "GROQ_API_KEY" in d.message


async def test_keys_go_only_to_their_own_base_url(tmp_path: Path, groq: GroqFake) -> None:
    other = FakeUpstream()
    await other.start()
    try:
        settings = make_settings(
            tmp_path,
            groq_base_url=groq.base_url,
            groq_api_key=KEY,
            openai_base_url=other.base_url,
            openai_api_key=OPENAI_KEY,
            allowed_endpoints=(other.base_url,),
        )
        async with running_gateway(settings) as gw:
            # A groq request at another endpoint: the placeholder key, not Groq's.
            await gw.chat.Create(request(llm_config=config(model_endpoint=other.base_url)), timeout=10)
            # An OpenAI request: OpenAI's key at OpenAI's base URL, never Groq's.
            await gw.chat.Create(request(llm_config=config(model_endpoint_type="openai")), timeout=10)
        first, second = other.requests
        assert KEY not in str(first.headers) and OPENAI_KEY not in str(first.headers)
        assert second.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
        assert not groq.requests
    finally:
        await other.stop()


async def test_byok_groq_provider(tmp_path: Path, groq: GroqFake) -> None:
    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    byok_key = "gsk_byok_" + secrets.token_hex(24)
    settings = make_settings(
        tmp_path,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(groq.base_url,),
        groq_api_key=KEY,  # the server's key goes to the official endpoint only
    )
    async with running_gateway(settings) as gw:
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="team-groq", model_endpoint_type="groq", base_url=groq.base_url, api_key=byok_key
            ),
            metadata=metadata,
            timeout=10,
        )
        llm = config(provider_name="team-groq", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK)
        await gw.chat.Create(request(llm_config=llm), metadata=metadata, timeout=10)
    (rec,) = groq.requests
    assert rec.path == "/openai/v1/chat/completions"
    assert rec.headers["Authorization"] == f"Bearer {byok_key}"
    assert KEY not in str(rec.headers)
