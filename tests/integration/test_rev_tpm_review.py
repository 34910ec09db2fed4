"""Review of the over-the-minute-limit mapping (commit 0752cb2): the same error as a stream's first
`error` event, the upstream's `code` in the metadata, and a route every deployment refuses."""

from __future__ import annotations

from pathlib import Path

import grpc
import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.providers import errors
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_groq_gateway import GroqFake
from tests.integration.test_over_minute_limit import GROQ_413, OPENAI_429_TOO_LARGE, groq_then_other
from tests.integration.test_routing_e2e import KEYS, deployment, gateway_with, routed, router_of, routes_toml


def _stream_request(base_url: str) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest(
        llm_config=chat_pb2.LLMConfig(model="gpt-4o", model_endpoint_type="openai", model_endpoint=base_url),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )


QUOTA = {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": 429}


@pytest.mark.parametrize("kind", ["too_large", "quota"])
async def test_a_first_stream_event_no_wait_clears_is_not_retried(tmp_path: Path, kind: str) -> None:
    # OpenRouter and proxies send an upstream's 429 as the stream's first event (HTTP 200): the
    # same request is as much too large there (and a used-up quota as used up); it must not be
    # retried to the end of the budget, as the same error with HTTP 429 is not.
    event = (
        {"error": {**OPENAI_429_TOO_LARGE["error"], "code": 429}} if kind == "too_large" else {"error": QUOTA}
    )
    upstream = FakeUpstream()
    await upstream.start()
    try:
        upstream.script(*[Reply(sse=[event])] * 6)
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in gw.chat.StreamCreate(_stream_request(upstream.base_url), timeout=20):
                    pass
        sent = len(upstream.requests)
    finally:
        await upstream.stop()
    d = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert sent == 1
    assert d.retry_delay is None
    assert d.metadata["http_status"] == "200"
    if kind == "too_large":
        assert d.metadata["requested_tokens"] == "342389"


def test_the_upstream_code_in_the_metadata_is_scrubbed() -> None:
    secret = "sk-proj-SECRETSECRETSECRET"
    body = {"error": {**OPENAI_429_TOO_LARGE["error"], "code": f"rate_limit_exceeded {secret}"}}
    error = errors.error_for_status(
        429, orjson.dumps(body), {}, provider="openai", scrub=lambda s: s.replace(secret, "[redacted]")
    )
    assert secret not in str(error.metadata)


@pytest.fixture
def route_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("route_keys")
async def test_every_deployment_too_large_ends_once_each_without_retry_info(tmp_path: Path) -> None:
    fakes = [GroqFake(), FakeUpstream()]
    for fake in fakes:
        await fake.start()
    try:
        fakes[0].default = Reply(status=413, json_body=GROQ_413)
        fakes[1].default = Reply(status=429, json_body=OPENAI_429_TOO_LARGE, headers={"Retry-After": "1"})
        text = groq_then_other(fakes)
        async with await gateway_with(tmp_path, text) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.chat.Create(routed(), timeout=10)
            cooling = dict(router_of(gw).health._until)  # noqa: SLF001
        sent = [len(f.requests) for f in fakes]
    finally:
        for fake in fakes:
            await fake.stop()
    d = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert sent == [1, 1]  # the last candidate's retry policy does not retry it either
    assert d.retry_delay is None
    assert d.metadata["deployments"] == "chat/a,chat/b"
    assert d.metadata["attempts"] == "2"
    assert (d.metadata["limit_tokens_per_minute"], d.metadata["requested_tokens"]) == ("30000", "342389")
    assert cooling == {}


@pytest.mark.usefixtures("route_keys")
async def test_two_keys_try_the_other_key_then_the_next_deployment(tmp_path: Path) -> None:
    # Each key may be another organization (another tier, another limit): the other key is worth
    # one attempt; nothing cools down.
    fakes = [FakeUpstream(), FakeUpstream()]
    for fake in fakes:
        await fake.start()
    try:
        fakes[0].default = Reply(status=429, json_body=OPENAI_429_TOO_LARGE)
        fakes[1].default = Reply(json_body=completion("from b"))
        text = routes_toml(
            {
                "chat": (
                    {},
                    [
                        deployment("a", fakes[0].base_url, weight=1e12, keys=["ROUTE_KEY_A", "ROUTE_KEY_C"]),
                        deployment("b", fakes[1].base_url, weight=1e-9),
                    ],
                )
            },
            cooldown_seconds=5.0,
        )
        async with await gateway_with(tmp_path, text) as gw:
            response = await gw.chat.Create(routed(), timeout=10)
            cooling = dict(router_of(gw).health._until)  # noqa: SLF001
        sent = [len(f.requests) for f in fakes]
    finally:
        for fake in fakes:
            await fake.stop()
    assert response.deployment.name == "b"
    assert sent == [2, 1]
    assert cooling == {}
