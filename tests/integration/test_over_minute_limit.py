"""A request that alone is over the provider's tokens-per-minute limit (Groq's 413, OpenAI's 429
"Request too large ... (TPM): Limit N, Requested M"): waiting never lets it through, so it is
RESOURCE_EXHAUSTED RATE_LIMIT_EXCEEDED at once (no retry, no RetryInfo, the counts in metadata),
and a route falls back to the next deployment without cooling the first one down (it still takes
smaller requests). The ordinary "Rate limit reached ... Please try again in 4.77s" 429 is still
retried. Payloads as Groq and OpenAI answer them (users' reports of both, 2024-2026), and as
OpenRouter wraps them ("Provider returned error", the provider's body in error.metadata.raw)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_groq_gateway import KEY, GroqFake, request
from tests.integration.test_groq_gateway import groq as groq  # the fixture
from tests.integration.test_routing_e2e import KEYS, deployment, gateway_with, routed, router_of, routes_toml
from tests.trace_polling import wait_for_trace

GROQ_413 = {
    "error": {
        "message": (
            "Request too large for model `llama-3.3-70b-versatile` in organization "
            "`org_01kgg5588eftc8k70a` service tier `on_demand` on tokens per minute (TPM): Limit "
            "6000, Requested 12328, please reduce your message size and try again. Need more tokens? "
            "Upgrade to Dev Tier today at https://console.groq.com/settings/billing"
        ),
        "type": "tokens",
        "code": "rate_limit_exceeded",
    }
}
OPENAI_429_TOO_LARGE = {
    "error": {
        "message": (
            "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit "
            "30000, Requested 342389. The input or output tokens must be reduced in order to run "
            "successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
        ),
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
GROQ_429_WAIT = {
    "error": {
        "message": (
            "Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01j5b4pz` "
            "service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5034, Requested "
            "1443. Please try again in 4.77s."
        ),
        "type": "tokens",
        "code": "rate_limit_exceeded",
    }
}


async def _fail(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return caught.value


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_groq_413_over_the_minute_limit_is_rate_limited_once(
    tmp_path: Path, groq: GroqFake, streamed: bool
) -> None:
    groq.script(*[Reply(status=413, json_body=GROQ_413)] * 3)
    settings = make_settings(tmp_path, groq_base_url=groq.base_url, groq_api_key=KEY)
    async with running_gateway(settings) as gw:
        req = request()
        if streamed:
            call: Any = gw.chat.StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(req.SerializeToString()), timeout=10
            )
        else:
            call = gw.chat.Create(req, timeout=10)
        error = await _fail(call)
    d = expect(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert len(groq.requests) == 1  # never retried: the same request is always too large
    assert d.retry_delay is None  # no RetryInfo: waiting does not help
    assert d.metadata["http_status"] == "413"
    assert d.metadata["upstream_code"] == "rate_limit_exceeded"
    assert d.metadata["limit_tokens_per_minute"] == "6000"
    assert d.metadata["requested_tokens"] == "12328"
    assert "per-minute token limit" in d.message and "Limit 6000, Requested 12328" in d.message


async def test_openai_429_request_too_large_is_not_retried(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        upstream.script(
            *[Reply(status=429, json_body=OPENAI_429_TOO_LARGE, headers={"Retry-After": "1"})] * 3
        )
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))) as gw:
            req = chat_pb2.CreateRequest(
                llm_config=chat_pb2.LLMConfig(
                    model="gpt-4o", model_endpoint_type="openai", model_endpoint=upstream.base_url
                ),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
            )
            error = await _fail(gw.chat.Create(req, timeout=10))
        assert len(upstream.requests) == 1
    finally:
        await upstream.stop()
    d = expect(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay is None
    assert (d.metadata["limit_tokens_per_minute"], d.metadata["requested_tokens"]) == ("30000", "342389")


async def test_the_ordinary_429_is_still_retried(tmp_path: Path, groq: GroqFake) -> None:
    # "Used N, Requested M. Please try again in 4.77s": the minute's budget is used up, the next
    # minute takes it.
    groq.script(
        Reply(status=429, json_body=GROQ_429_WAIT, headers={"Retry-After": "0"}),
        Reply(json_body=completion("after the wait")),
    )
    settings = make_settings(tmp_path, groq_base_url=groq.base_url, groq_api_key=KEY)
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request(), timeout=10)
    assert response.completion.choices[0].message.content == "after the wait"
    assert len(groq.requests) == 2


def groq_then_other(fakes: list[FakeUpstream]) -> str:
    """A route of Groq deployment `a` (chosen first) and `b`, 5 s cooldowns."""
    return routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, provider="groq"),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        },
        cooldown_seconds=5.0,
    )


@pytest.fixture
def route_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("route_keys")
@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_route_falls_back_without_cooling_the_deployment_down(tmp_path: Path, kind: str) -> None:
    fakes = [GroqFake(), FakeUpstream()]
    for fake in fakes:
        await fake.start()
    try:
        fakes[0].default = Reply(status=413, json_body=GROQ_413)
        fakes[1].default = (
            Reply(sse=text_stream(["from", " b"]))
            if kind == "stream"
            else Reply(json_body=completion("from b"))
        )
        text = groq_then_other(fakes)
        async with await gateway_with(tmp_path, text) as gw:
            if kind == "unary":
                response = await gw.chat.Create(routed(step="s-tpm"), timeout=10)
                name, trace_id = response.deployment.name, response.provider_trace_id
            else:
                request_bytes = routed(step="s-tpm").SerializeToString()
                stream = gw.chat.StreamCreate(
                    chat_pb2.StreamCreateRequest.FromString(request_bytes), timeout=10
                )
                events = [e async for e in stream]
                name, trace_id = events[-1].deployment.name, events[-1].provider_trace_id
            trace = await wait_for_trace(gw.traces, "s-tpm", trace_id=trace_id)
            cooling = dict(router_of(gw).health._until)  # noqa: SLF001 - every unit cooling down, keys too
            # A takes the next (smaller) request again at once: nothing cooled down.
            fakes[0].default = Reply(json_body=completion("from a"))
            again = await gw.chat.Create(routed(), timeout=10)
    finally:
        for fake in fakes:
            await fake.stop()
    assert name == "b"
    assert [(a.deployment, a.status) for a in trace.attempts] == [
        ("chat/a", "RATE_LIMIT_EXCEEDED"),
        ("chat/b", "OK"),
    ]
    assert cooling == {}
    assert again.deployment.name == "a"


# OpenRouter wraps the provider's answer: {"error": {"message": "Provider returned error", "code":
# 429, "metadata": {"raw": "<the provider's body>", "provider_name": "Groq"}}}.
OPENROUTER_KEY = "sk-or-v1-" + "r" * 64
OPENROUTER_WRAPPED_413 = {
    "error": {
        "message": "Provider returned error",
        "code": 429,
        "metadata": {"raw": json.dumps(GROQ_413), "provider_name": "Groq"},
    },
    "user_id": "user_2abc",
}


@pytest.mark.parametrize("kind", ["http_429", "stream_event"])
async def test_openrouter_wrapping_the_over_the_minute_text_maps_as_the_text_itself(
    tmp_path: Path, kind: str
) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        if kind == "http_429":  # OpenRouter's HTTP 429, with the usual Retry-After
            reply = Reply(status=429, json_body=OPENROUTER_WRAPPED_413, headers={"Retry-After": "1"})
        else:  # the same object as the first event of a 200 stream
            reply = Reply(sse=[OPENROUTER_WRAPPED_413])
        upstream.script(*[reply] * 4)
        settings = make_settings(
            tmp_path,
            openrouter_base_url=upstream.base_url,
            openrouter_api_key=OPENROUTER_KEY,
            allowed_endpoints=(upstream.base_url,),
        )
        async with running_gateway(settings) as gw:
            req = chat_pb2.CreateRequest(
                llm_config=chat_pb2.LLMConfig(
                    model="meta-llama/llama-3.3-70b-instruct",
                    model_endpoint_type="openai",
                    provider_name="openrouter",
                ),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
            )
            if kind == "http_429":
                error = await _fail(gw.chat.Create(req, timeout=10))
            else:
                stream_req = chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())
                error = await _fail(gw.chat.StreamCreate(stream_req, timeout=10))
        sent = len(upstream.requests)
    finally:
        await upstream.stop()
    d = expect(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert sent == 1  # not retried: the request is as much too large behind OpenRouter
    assert d.retry_delay is None
    assert (d.metadata["limit_tokens_per_minute"], d.metadata["requested_tokens"]) == ("6000", "12328")
    assert d.metadata["upstream_provider"] == "Groq"
    assert d.metadata["http_status"] == ("429" if kind == "http_429" else "200")
    assert (
        "openrouter answered HTTP" in d.message
        and "Provider returned error (Groq: Request too large" in d.message
    )
    assert OPENROUTER_KEY not in d.text()
