"""Attacks on routing (review of issue 16), each through the real gRPC server and real fake
upstreams: streams that fail after HTTP 200 but before the first event, cooldowns from every
form of retry hint, every provider's context-length error, the caller's deadline across
deployments and a fallback route, keys (rotation, disabling, echoes), reloads with calls in
flight, inline fallbacks under the endpoint policy, CountTokens on a route, and the fallback
metric."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import details, expect
from tests.integration.test_routing_e2e import (
    KEY_A,
    KEY_B,
    KEY_C,
    KEYS,
    deployment,
    gateway_with,
    routed,
    router_of,
    routes_toml,
    two_deployments,
    write_routes,
)
from tests.trace_polling import wait_for_trace

USER = chat_pb2.ROLE_USER


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream() for _ in range(4)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture(autouse=True)
def route_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


async def collect(gw: Any, request: chat_pb2.CreateRequest) -> list[chat_pb2.StreamCreateResponse]:
    return [e async for e in gw.chat.StreamCreate(request, timeout=10)]


# -- streams: HTTP 200, then a failure before the first event the caller would see ------------

ROLE = chunk({"role": "assistant", "content": ""})
EMPTY = chunk({"content": ""})
BEFORE_FIRST_EVENT = {
    # The status line said 200; the first SSE event is an error object (OpenRouter, proxies).
    "error_event_503": Reply(sse=[{"error": {"code": 503, "message": "overloaded"}}]),
    "error_event_429": Reply(sse=[{"error": {"code": 429, "message": "rate limited"}}]),
    # Only a role chunk and empty deltas came (nothing a caller sees), then the error / the cut.
    "role_then_error": Reply(sse=[ROLE, EMPTY, {"error": {"code": 502, "message": "bad gateway"}}]),
    "role_then_cut": Reply(sse=[ROLE, EMPTY, EMPTY, chunk({"content": "x"})], break_after=3),
    # Unreadable SSE before any delta: the deployment is broken, another may answer.
    "not_json": Reply(sse=["this is not json"]),
    "role_then_not_json": Reply(sse=[ROLE, "{broken"]),
    "vllm_error_object": Reply(sse=[{"object": "error", "message": "engine dead", "code": 500}]),
}


@pytest.mark.parametrize("failure", sorted(BEFORE_FIRST_EVENT))
async def test_stream_falls_back_on_a_failure_before_the_first_event(
    tmp_path: Path, fakes: list[FakeUpstream], failure: str
) -> None:
    fakes[0].script(BEFORE_FIRST_EVENT[failure])
    fakes[1].script(Reply(sse=text_stream(["from", " b"])))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        events = await collect(gw, routed())
    # The caller saw B's answer only: nothing of A's stream went out before the fallback.
    deltas = "".join(e.delta.content for e in events if e.HasField("delta"))
    assert deltas == "from b"
    assert events[-1].completion.choices[0].message.content == "from b"
    assert (events[-1].deployment.name, events[-1].deployment.attempts) == ("b", 2)
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1


async def test_unary_unreadable_answer_falls_back(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    # A deployment answering 200 with something that is not a completion (an HTML page of a
    # proxy): UPSTREAM_BAD_RESPONSE; the next deployment answers, and A cools down.
    fakes[0].script(Reply(raw=b"<html><title>Login</title></html>", content_type="text/html"))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        response = await gw.chat.Create(routed(), timeout=10)
        again = await gw.chat.Create(routed(), timeout=10)
    assert (response.deployment.name, again.deployment.name) == ("b", "b")
    assert len(fakes[0].requests) == 1


# -- cooldowns: every form of retry hint --------------------------------------------------------


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


async def test_cooldown_honours_retry_after_http_date_and_retry_after_ms(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    fakes[0].script(Reply(status=503, headers={"Retry-After": http_date(40)}, raw=b"down"))
    fakes[2].script(Reply(status=429, headers={"retry-after-ms": "25000"}, json_body={"error": {}}))
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            ),
            "other": (
                {},
                [
                    deployment("c", fakes[2].base_url, weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            ),
        },
        cooldown_seconds=1,
    )
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        assert (await gw.chat.Create(routed(), timeout=10)).deployment.name == "b"
        assert (await gw.chat.Create(routed("other"), timeout=10)).deployment.name == "b"
        health = router_of(gw).health
        deployment_until = health.cooling_until("chat/a") - started
        key_until = health.cooling_until("other/c#ROUTE_KEY_C") - started
    assert 37 < deployment_until < 42, deployment_until  # the HTTP date, not the 1 s cooldown
    assert 23 < key_until < 27, key_until


async def test_cooldown_honours_gemini_retry_info(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    fakes[0].script(
        Reply(
            status=429,
            json_body={
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted (e.g. check quota).",
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "33s"}],
                }
            },
        )
    )
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment(
                        "a", fakes[0].base_url, provider="google_ai", model="gemini-2.0-flash", weight=1e12
                    ),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        },
        cooldown_seconds=1,
    )
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        assert (await gw.chat.Create(routed(), timeout=10)).deployment.name == "b"
        until = router_of(gw).health.cooling_until("chat/a#ROUTE_KEY_A") - started
    assert 30 < until < 35, until


async def test_a_gemini_429_event_before_the_first_event_cools_for_its_retry_info(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # HTTP 200, then the 429 as the first SSE event: nothing relayed, so B answers, and A's key
    # cools for Google's RetryInfo (33 s) as for the same 429 as an HTTP answer, not the 1 s.
    error = {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "33s"}],
    }
    fakes[0].script(Reply(sse=[{"error": error}]))
    fakes[1].script(Reply(sse=text_stream(["from", " b"])))
    a = deployment("a", fakes[0].base_url, provider="google_ai", model="gemini-2.0-flash", weight=1e12)
    b = deployment("b", fakes[1].base_url, weight=1e-9)
    text = routes_toml({"chat": ({}, [a, b])}, cooldown_seconds=1)
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        events = await collect(gw, routed())
        until = router_of(gw).health.cooling_until("chat/a#ROUTE_KEY_A") - started
    assert events[-1].deployment.name == "b"
    assert 30 < until < 35, until


# -- every provider's context-length error falls back to the next deployment ----------------------

CONTEXT_ERRORS: dict[str, tuple[str, int, Any]] = {
    "openai": (
        "openai",
        400,
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "openai_context_window": (
        "openai",
        400,
        {
            "error": {
                "message": "Your input exceeds the context window of this model. Please adjust your input "
                "and try again.",
                "type": "invalid_request_error",
                "param": "input",
                "code": "context_length_exceeded",
            }
        },
    ),
    "azure": (
        "azure",
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, your messages "
                "resulted in 9000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "anthropic_prompt_too_long": (
        "anthropic",
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 201234 tokens > 200000 maximum",
            },
        },
    ),
    "anthropic_context_limit": (
        "anthropic",
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, "
                "decrease input length or `max_tokens` and try again",
            },
        },
    ),
    "gemini": (
        "google_ai",
        400,
        {
            "error": {
                "code": 400,
                "message": "The input token count (1234567) exceeds the maximum number of tokens allowed "
                "(1048576).",
                "status": "INVALID_ARGUMENT",
            }
        },
    ),
    "groq": (
        "groq",
        400,
        {
            "error": {
                "message": "Please reduce the length of the messages or completion.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "deepseek": (
        "deepseek",
        400,
        {
            "error": {
                "message": "This model's maximum context length is 65536 tokens. However, you requested "
                "70000 tokens (70000 in the messages, 0 in the completion). Please reduce the length of "
                "the messages or completion.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            }
        },
    ),
    "llamacpp": (
        "openai",
        400,
        {
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 5000,
                "n_ctx": 4096,
            }
        },
    ),
    "vllm": (
        "openai",
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 "
            "tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the "
            "messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ),
    "vllm_max_tokens": (
        "openai",
        400,
        {
            "error": {
                "message": "'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum "
                "context length is 4096 tokens and your request has 10 input tokens (5000 > 4096 - 10).",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        },
    ),
    "vllm_v1_decoder_prompt": (
        "openai",
        400,
        {
            "error": {
                "message": "The decoder prompt (length 5000) is longer than the maximum model length of "
                "4096. Make sure that `max_model_len` is no smaller than the number of text tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        },
    ),
    "mistral": (
        "openai",
        400,
        {
            "object": "error",
            "message": "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 "
            "maximum context length",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CONTEXT_ERRORS))
async def test_every_providers_context_length_error_falls_back(
    tmp_path: Path, fakes: list[FakeUpstream], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, status, body = CONTEXT_ERRORS[case]
    fakes[0].script(Reply(status=status, json_body=body))
    extra: dict[str, Any] = {"provider": provider}
    overrides: dict[str, Any] = {}
    if provider == "azure":
        overrides["azure_api_version"] = "2024-10-21"
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, **extra),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        }
    )
    async with await gateway_with(tmp_path, text, **overrides) as gw:
        response = await gw.chat.Create(routed(step=f"s-{case}"), timeout=10)
        trace = await wait_for_trace(gw.traces, f"s-{case}", trace_id=response.provider_trace_id)
        # The same error from every deployment: the call ends with CONTEXT_WINDOW_EXCEEDED (the
        # reason an agent acts on by summarizing), having tried both.
        fakes[0].script(Reply(status=status, json_body=body))
        fakes[1].script(Reply(status=400, json_body=CONTEXT_ERRORS["openai"][2]))
        router_of(gw).health._until.clear()  # noqa: SLF001 - nothing is cooling: A is tried first again
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=10)
    assert response.deployment.name == "b" and response.deployment.attempts == 2
    assert [(a.deployment, a.status) for a in trace.attempts] == [
        ("chat/a", "CONTEXT_WINDOW_EXCEEDED"),
        ("chat/b", "OK"),
    ]
    d = expect(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED")
    assert d.metadata["deployments"] == "chat/a,chat/b" and d.metadata["attempts"] == "2"


IN_BODY_OVERFLOW = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in "
        "9000 tokens.",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    }
}


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_an_in_body_context_length_error_falls_back_without_cooling(
    tmp_path: Path, fakes: list[FakeUpstream], kind: str
) -> None:
    # HTTP 200 whose body (or first SSE event) is an OpenAI-shaped error object with a string code,
    # as proxies relay it: the prompt's fault, so B takes it and A is not cooled down.
    fakes[0].script(Reply(json_body=IN_BODY_OVERFLOW) if kind == "unary" else Reply(sse=[IN_BODY_OVERFLOW]))
    fakes[1].script(
        Reply(sse=text_stream(["from", " b"])) if kind == "stream" else Reply(json_body=completion())
    )
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        if kind == "unary":
            response = await gw.chat.Create(routed(step="s-ib"), timeout=10)
            name, trace_id = response.deployment.name, response.provider_trace_id
        else:
            events = await collect(gw, routed(step="s-ib"))
            name, trace_id = events[-1].deployment.name, events[-1].provider_trace_id
        trace = await wait_for_trace(gw.traces, "s-ib", trace_id=trace_id)
        cooling = router_of(gw).health.cooling_until("chat/a")
    assert name == "b"
    assert [a.status for a in trace.attempts] == ["CONTEXT_WINDOW_EXCEEDED", "OK"]
    assert cooling == 0.0


# -- the caller's deadline across three deployments and a fallback route ------------------------


def slow_route(fakes: list[FakeUpstream], **top: Any) -> str:
    return routes_toml(
        {
            "chat": (
                {"fallbacks": ["backup"]},
                [
                    deployment("a", fakes[0].base_url, weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e3),
                    deployment("c", fakes[2].base_url, weight=1e-9),
                ],
            ),
            "backup": ({}, [deployment("d", fakes[3].base_url, key="ROUTE_KEY_A")]),
        },
        **top,
    )


async def test_slow_deployments_and_a_fallback_route_never_outlast_the_deadline(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # Each of A, B, C answers 503 after 0.35 s; D (the fallback route) answers after 0.35 s.
    for fake in fakes[:3]:
        fake.default = Reply(status=503, delay=0.35, json_body={"error": {"message": "busy"}})
    fakes[3].default = Reply(json_body=completion("from d"), delay=0.35)
    async with await gateway_with(tmp_path, slow_route(fakes, cooldown_seconds=0)) as gw:
        await gw.chat.Create(routed("backup"), timeout=10)  # warm: token counting, connections
        fakes[3].requests.clear()
        deadline = 0.9
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=deadline)
        elapsed = time.monotonic() - started
        arrivals = sorted(r.at - started for fake in fakes for r in fake.requests)
        # Room for all four: A, B, C fail in turn, D answers, inside the deadline.
        for fake in fakes:
            fake.requests.clear()
        started_ok = time.monotonic()
        response = await gw.chat.Create(routed(), timeout=4.0)
        elapsed_ok = time.monotonic() - started_ok
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < deadline + 0.15, elapsed
    assert len(arrivals) == 3 and arrivals[-1] < deadline, arrivals  # D never started
    # The caller learns what was tried, before its own deadline ends the call without details.
    d = details(caught.value)
    assert d.metadata["route"] == "chat" and d.metadata["attempts"] == "3", d.metadata
    assert d.metadata["deployments"].split(",")[:2] == ["chat/a", "chat/b"], d.metadata
    assert d.metadata["last_error"] in ("UPSTREAM_UNAVAILABLE", "DEADLINE_EXCEEDED"), d.metadata
    assert response.deployment.route == "chat" and response.deployment.name == "d"
    assert response.deployment.attempts == 4 and 1.35 <= elapsed_ok < 4.0


async def test_everything_cooling_across_a_fallback_route_with_and_without_room(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    for fake in fakes:
        fake.script(
            Reply(status=429, headers={"Retry-After": "1.2"}, json_body={"error": {"message": "slow"}})
        )
    async with await gateway_with(tmp_path, slow_route(fakes, cooldown_seconds=0)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=0.5)
        first = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
        cooled = time.monotonic()
        # D's key (ROUTE_KEY_A of `backup`) is its own unit: 4 attempts, all rate limited.
        assert first.metadata["attempts"] == "4", first.metadata
        assert first.metadata["deployments"].split(",")[-1] == "backup/d"
        # No room: at once, RetryInfo to the earliest recovery, nothing sent.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=0.6)
        no_room = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
        assert time.monotonic() - started < 0.3
        assert no_room.retry_delay is not None and 0.5 < no_room.retry_delay <= 1.2
        assert sum(len(f.requests) for f in fakes) == 4
        # Room: waits for the earliest recovery, then answers, inside its deadline.
        started = time.monotonic()
        response = await gw.chat.Create(routed(), timeout=3.0)
        took = time.monotonic() - started
    assert response.completion.choices[0].message.content == "Hello!"
    assert time.monotonic() - cooled >= 1.1 and took < 3.0


# -- keys ---------------------------------------------------------------------------------------


async def test_three_keys_rotate_on_429_and_a_refused_key_stays_off_until_reload(
    tmp_path: Path, fakes: list[FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keys = ["ROUTE_KEY_A", "ROUTE_KEY_B", "ROUTE_KEY_C"]
    text = routes_toml({"chat": ({}, [deployment("a", fakes[0].base_url, keys=keys)])}, cooldown_seconds=0)
    rate = Reply(status=429, headers={"Retry-After": "30"}, json_body={"error": {"message": "rate"}})
    refused = Reply(status=401, json_body={"error": {"message": f"Incorrect API key provided: {KEY_B}"}})
    fakes[0].script(rate, refused)
    async with await gateway_with(tmp_path, text) as gw:
        first = await gw.chat.Create(routed(), timeout=10)  # A: 429, B: 401, C answers
        later = [await gw.chat.Create(routed(), timeout=10) for _ in range(3)]  # only C is usable
        assert await router_of(gw).reload()  # B is tried again; A still cools for its Retry-After
        after_reload = [await gw.chat.Create(routed(), timeout=10) for _ in range(2)]
    sent = [r.headers["Authorization"].removeprefix("Bearer ") for r in fakes[0].requests]
    assert sent[:3] == [KEY_A, KEY_B, KEY_C]
    assert sent[3:6] == [KEY_C, KEY_C, KEY_C]
    assert sorted(sent[6:]) == sorted([KEY_B, KEY_C]), sent[6:]
    assert first.deployment.attempts == 3
    assert all(r.deployment.name == "a" for r in (first, *later, *after_reload))
    assert "ROUTE_KEY_B" in caplog.text and KEY_B not in caplog.text


async def test_refused_keys_echoed_by_the_upstream_reach_no_error_trace_or_log(
    tmp_path: Path, fakes: list[FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for fake, key in ((fakes[0], KEY_A), (fakes[1], KEY_B)):
        fake.script(Reply(status=401, json_body={"error": {"message": f"Incorrect API key provided: {key}"}}))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(step="s-echo"), timeout=10)
        trace = await wait_for_trace(gw.traces, "s-echo")
    d = expect(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED")
    assert d.metadata["deployments"] == "chat/a,chat/b" and d.metadata["last_error"] == "UPSTREAM_AUTH_FAILED"
    everything = (
        d.message + str(dict(d.metadata)) + str(caught.value.trailing_metadata()) + str(trace) + caplog.text
    )
    for key in (KEY_A, KEY_B):
        assert key not in everything and key[:20] not in everything


async def test_byok_cooldowns_are_per_organization_and_keys_never_cross(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    import secrets

    from llmgateway.v1 import providers_pb2

    from server.auth.store_sqlite import SqliteAuthStore

    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin_a = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
        _, admin_b = await store.create_key(organization_id="org-b", user_id="", is_admin=True)
    key_a, key_b = "sk-byok-a-" + secrets.token_hex(20), "sk-byok-b-" + secrets.token_hex(20)
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    {"name": "tenant", "provider": "openai", "model": "m", "byok": "team", "weight": 1e12},
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        }
    )
    fakes[0].script(
        Reply(status=429, headers={"Retry-After": "30"}, json_body={"error": {"message": "rate"}})
    )
    async with await gateway_with(
        tmp_path,
        text,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(fakes[0].base_url, fakes[2].base_url),
    ) as gw:
        for admin, url, key in ((admin_a, fakes[0].base_url, key_a), (admin_b, fakes[2].base_url, key_b)):
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="team", model_endpoint_type="openai", base_url=url, api_key=key
                ),
                metadata=(("authorization", f"Bearer {admin}"),),
                timeout=10,
            )
        as_a = (("authorization", f"Bearer {admin_a}"),)
        as_b = (("authorization", f"Bearer {admin_b}"),)
        one = await gw.chat.Create(routed(), metadata=as_a, timeout=10)  # org-a's key: 429 -> b
        two = await gw.chat.Create(routed(), metadata=as_b, timeout=10)  # org-b's own: not cooling
        three = await gw.chat.Create(routed(), metadata=as_a, timeout=10)  # org-a's still cools
    assert (one.deployment.name, two.deployment.name, three.deployment.name) == ("b", "tenant", "b")
    assert [r.headers["Authorization"] for r in fakes[0].requests] == [f"Bearer {key_a}"]
    assert [r.headers["Authorization"] for r in fakes[2].requests] == [f"Bearer {key_b}"]
    assert all(r.headers["Authorization"] == f"Bearer {KEY_B}" for r in fakes[1].requests)


# -- SIGHUP with streams in flight; a route removed under a call ---------------------------------


def one_route(route: str, name: str, base_url: str, variable: str) -> str:
    return (
        f"[routes.{route}]\n[[routes.{route}.deployments]]\n"
        f'name = "{name}"\nprovider = "openai"\nmodel = "m-{name}"\n'
        f'base_url = "{base_url}"\nkey = "{variable}"\n'
    )


class BothUpstream(FakeUpstream):
    """Streams a slow SSE answer to stream requests and a JSON completion to unary ones."""

    async def _answer(self, request: Any, reply: Reply) -> Any:
        if reply is self.default:
            body = await request.json()
            if not body.get("stream"):
                reply = Reply(json_body=completion("w" * 6), delay=0.05)
        return await super()._answer(request, reply)


@pytest.mark.slow
async def test_sighup_with_streams_and_unary_calls_in_flight_loses_none(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    import os
    import signal

    from llmgateway.v1 import chat_pb2_grpc

    from tests.process_harness import async_server_process
    from tests.trace_polling import eventually

    # Streams last ~0.3 s (6 chunks 50 ms apart): every reload lands in the middle of some.
    fakes = [BothUpstream(), BothUpstream()]
    for fake in fakes:
        await fake.start()
        fake.default = Reply(sse=text_stream(["w"] * 6), chunk_delay=0.05)
    path = tmp_path / "routes.toml"
    path.write_text(one_route("chat", "a", fakes[0].base_url, "ROUTE_KEY_A"))
    env = {"LLMGW_ROUTES_FILE": str(path), **KEYS}
    async with async_server_process(tmp_path, env=env, listen="127.0.0.1:0") as server:
        channel = grpc.aio.insecure_channel(server.address)
        stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        done: list[str] = []
        stop = asyncio.Event()
        request = routed()

        async def streamer() -> None:
            while not stop.is_set():
                events = [e async for e in stub.StreamCreate(request, timeout=10)]  # a failure fails
                assert events[-1].completion.choices[0].message.content == "w" * 6
                done.append(events[-1].deployment.name)

        async def unary() -> None:
            while not stop.is_set():
                response = await stub.Create(request, timeout=10)
                done.append(response.deployment.name)

        tasks = [asyncio.create_task(streamer()) for _ in range(6)] + [
            asyncio.create_task(unary()) for _ in range(2)
        ]
        try:
            await eventually(lambda: len(done) >= 10, timeout=30)
            for n in range(6):  # reloads back to back, alternating the deployment
                name, fake, variable = (
                    ("b", fakes[1], "ROUTE_KEY_B") if n % 2 == 0 else ("a", fakes[0], "ROUTE_KEY_A")
                )
                tmp = path.with_suffix(".tmp")
                tmp.write_text(one_route("chat", name, fake.base_url, variable))
                os.replace(tmp, path)
                server.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.15)
            await eventually(lambda: server.log.count("routes reloaded") >= 6, timeout=30)
            seen = len(done)
            await eventually(lambda: len(done) >= seen + 10, timeout=30)
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close()
        assert all(r is None for r in results), [r for r in results if r is not None]
        assert server.process.poll() is None
    for fake in fakes:
        await fake.stop()
    assert {"a", "b"} <= set(done)


async def test_a_route_removed_while_a_call_on_it_is_in_flight(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # A fails slowly (0.4 s, 503); during it the file is replaced by one without `chat`. The call
    # finishes on the routes it started with (falls back to B); a new call on `chat` is NOT_FOUND.
    fakes[0].script(Reply(status=503, delay=0.4, json_body={"error": {"message": "busy"}}))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        call = asyncio.ensure_future(gw.chat.Create(routed(), timeout=10))
        while not fakes[0].requests:
            await asyncio.sleep(0.01)
        write_routes(tmp_path, one_route("other", "c", fakes[2].base_url, "ROUTE_KEY_C"))
        assert await router_of(gw).reload()
        response = await call
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=10)
        other = await gw.chat.Create(routed("other"), timeout=10)
    assert response.deployment.name == "b" and response.deployment.attempts == 2
    assert expect(caught.value, grpc.StatusCode.NOT_FOUND, "NOT_FOUND").metadata["route"] == "chat"
    assert other.deployment.name == "c"


# -- inline fallbacks under the endpoint policy and the server-key rules --------------------------


def inline(url: str, model: str = "m-inline") -> chat_pb2.LLMConfig:
    return chat_pb2.LLMConfig(model=model, model_endpoint_type="openai", model_endpoint=url)


async def test_inline_fallbacks_to_private_addresses_are_never_called(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    fakes[0].script(Reply(status=503, json_body={"error": {"message": "busy"}}))
    request = chat_pb2.CreateRequest(
        llm_config=inline(fakes[0].base_url, "m0"),
        fallbacks=[
            inline("http://169.254.169.254/latest/meta-data"),  # cloud metadata
            inline(fakes[2].base_url),  # loopback, not allowed for this caller
            inline("http://10.0.0.1:8000/v1"),  # private, not allowed
            inline(fakes[1].base_url, "m1"),
        ],
        messages=[chat_pb2.Message(role=USER, content="hi")],
        trace=chat_pb2.TraceContext(step_id="s-ssrf"),
    )
    settings = make_settings(tmp_path, allowed_endpoints=(fakes[0].base_url, fakes[1].base_url))
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request, timeout=10)
        trace = await wait_for_trace(gw.traces, "s-ssrf", trace_id=response.provider_trace_id)
        # Only disallowed endpoints left after the first: PERMISSION_DENIED, as a direct call.
        del request.fallbacks[3]
        fakes[0].script(Reply(status=503, json_body={"error": {"message": "busy"}}))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(request, timeout=10)
        only = chat_pb2.CreateRequest(
            llm_config=inline(fakes[2].base_url), fallbacks=[inline("http://10.0.0.1:8000/v1")]
        )
        only.messages.add(role=USER, content="hi")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await gw.chat.Create(only, timeout=10)
    assert response.deployment.name == "fallbacks[3]" and fakes[1].requests[0].body["model"] == "m1"
    assert fakes[2].requests == []
    assert [(a.deployment, a.status) for a in trace.attempts] == [
        ("llm_config", "UPSTREAM_UNAVAILABLE"),
        ("fallbacks[0]", "SKIPPED_ENDPOINT_NOT_ALLOWED"),
        ("fallbacks[1]", "SKIPPED_ENDPOINT_NOT_ALLOWED"),
        ("fallbacks[2]", "SKIPPED_ENDPOINT_NOT_ALLOWED"),
        ("fallbacks[3]", "OK"),
    ]
    assert "fallbacks[1] (SKIPPED_ENDPOINT_NOT_ALLOWED)" in caught.value.details()
    expect(denied.value, grpc.StatusCode.PERMISSION_DENIED, "ENDPOINT_NOT_ALLOWED")


async def test_inline_fallbacks_send_the_server_key_only_to_its_own_base_url(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    server_key = "sk-server-" + "s" * 40
    for fake in fakes[:2]:
        fake.default = Reply(status=503, json_body={"error": {"message": "busy"}})
    fakes[2].default = Reply(status=503, json_body={"error": {"message": "busy"}})
    request = routed(
        fallbacks=[
            inline(fakes[2].base_url),  # allowed endpoint, no key: never the server's key
            chat_pb2.LLMConfig(model="m-server", model_endpoint_type="openai"),  # the server's base URL
        ]
    )
    settings = make_settings(
        tmp_path,
        routes_file=write_routes(tmp_path, two_deployments(fakes)),
        allowed_endpoints=(fakes[2].base_url,),
        openai_api_key=server_key,
        openai_base_url=fakes[3].base_url,
    )
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request, timeout=10)
    assert response.deployment.name == "fallbacks[1]"
    assert [r.headers["Authorization"] for r in fakes[3].requests] == [f"Bearer {server_key}"]
    sent_elsewhere = [r.headers.get("Authorization", "") for f in fakes[:3] for r in f.requests]
    assert sent_elsewhere and all(server_key not in h for h in sent_elsewhere)


# -- metrics: fallbacks counted by reason, exactly -------------------------------------------------


async def test_metrics_count_fallbacks_by_reason_exactly(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    from tests.integration.test_admin_metrics import delta, scrape

    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            ),
            "small": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, context_window=20),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            ),
        },
        cooldown_seconds=0,  # A is tried first every time
    )
    async with await gateway_with(tmp_path, text, admin_listen="127.0.0.1:0") as gw:
        admin = gw.server.admin
        assert admin is not None
        before = await scrape(admin.port)
        busy = Reply(status=503, json_body={"error": {"message": "busy"}})
        fakes[0].script(busy, Reply(status=429, json_body={"error": {"message": "rate"}}))
        await gw.chat.Create(routed(), timeout=10)  # 503 -> B
        await gw.chat.Create(routed(), timeout=10)  # 429 -> B
        await gw.chat.Create(routed("small", text="word " * 100), timeout=10)  # A skipped -> B
        fakes[0].script(Reply(status=400, json_body={"error": {"message": "bad"}}))
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(routed(), timeout=10)  # not retryable: no fallback
        fakes[0].script(busy)
        fakes[1].default = busy  # B, the last candidate, retries with the policy: busy each time
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(routed(), timeout=10)  # A -> B (one fallback), B fails: nothing left
        fakes[1].default = Reply(json_body=completion())
        fakes[0].script(Reply(status=503, raw=b"down"))
        fakes[1].script(Reply(sse=text_stream(["x"])))
        [e async for e in gw.chat.StreamCreate(routed(), timeout=10)]  # a stream's fallback
        after = await scrape(admin.port)
    name = "llmgw_fallbacks_total"
    assert delta(before, after, name, reason="UPSTREAM_UNAVAILABLE") == 3
    assert delta(before, after, name, reason="RATE_LIMIT_EXCEEDED") == 1
    assert delta(before, after, name, reason="CONTEXT_WINDOW_EXCEEDED") == 1
    assert delta(before, after, name, reason="UPSTREAM_REJECTED") == 0


async def test_the_console_trace_page_shows_the_route_and_every_attempt(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    import html

    import aiohttp

    from server.auth.store_sqlite import SqliteAuthStore

    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    fakes[0].script(Reply(status=503, json_body={"error": {"message": "busy"}}))
    async with await gateway_with(
        tmp_path, two_deployments(fakes), auth="required", admin_listen="127.0.0.1:0"
    ) as gw:
        response = await gw.chat.Create(
            routed(step="s-page"), metadata=(("authorization", f"Bearer {admin}"),), timeout=10
        )
        await wait_for_trace(
            gw.traces,
            "s-page",
            trace_id=response.provider_trace_id,
            metadata=(("authorization", f"Bearer {admin}"),),
        )
        assert gw.server.admin is not None
        url = f"http://127.0.0.1:{gw.server.admin.port}/traces/{response.provider_trace_id}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Authorization": f"Bearer {admin}"}) as r:
                assert r.status == 200
                page = html.unescape(await r.text())
    section = page[page.index('id="routing"') :]
    table = section[: section.index("</table>")]
    assert "chat/a" in table and "UPSTREAM_UNAVAILABLE" in table
    assert "chat/b" in table and "OK" in table and " ms" in table
    assert KEY_A not in page and KEY_B not in page


async def test_count_tokens_on_a_route_follows_health_and_the_route_restriction(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, context_window=1000),
                    deployment("b", fakes[1].base_url, weight=1e-9, context_window=2000),
                ],
            ),
            "private": ({"organizations": ["org-x"]}, [deployment("c", fakes[2].base_url)]),
        }
    )
    fakes[0].script(
        Reply(status=503, headers={"Retry-After": "30"}, json_body={"error": {"message": "busy"}})
    )

    def count(route: str) -> chat_pb2.CountTokensRequest:
        return chat_pb2.CountTokensRequest(route=route, messages=[chat_pb2.Message(role=USER, content="hi")])

    async with await gateway_with(tmp_path, text) as gw:
        before = await gw.chat.CountTokens(count("chat"), timeout=10)
        await gw.chat.Create(routed(), timeout=10)  # A fails and cools for 30 s
        after = await gw.chat.CountTokens(count("chat"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.CountTokens(count("private"), timeout=10)
    assert (before.context_window, after.context_window) == (1000, 2000)
    assert expect(caught.value, grpc.StatusCode.NOT_FOUND, "NOT_FOUND").metadata["route"] == "private"
    assert fakes[2].requests == []
