"""Routes end to end: the real gateway in front of several fake upstreams with scripted
failures. Fallback on each retryable class and not on the others, key rotation, cooldowns and
Retry-After, all-cooling-down with and without deadline room, context-window skips, streams,
the caller's deadline across fallbacks, traces and answers saying who answered, keys nowhere."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from server.config import RetrySettings
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import details, expect
from tests.trace_polling import wait_for_trace

KEY_A = "sk-route-a-" + "a" * 40
KEY_B = "sk-route-b-" + "b" * 40
KEY_C = "sk-route-c-" + "c" * 40
KEYS = {"ROUTE_KEY_A": KEY_A, "ROUTE_KEY_B": KEY_B, "ROUTE_KEY_C": KEY_C}
USER = chat_pb2.ROLE_USER


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream() for _ in range(3)]
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


def deployment(name: str, base_url: str, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": name,
        "provider": "openai",
        "model": f"model-{name}",
        "base_url": base_url,
    }
    if "keys" not in fields:
        values["key"] = "ROUTE_KEY_" + name.upper()
    values.update(fields)
    return values


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def routes_toml(routes: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], **top: Any) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, (settings, deployments) in routes.items():
        lines.append(f"[routes.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
        for d in deployments:
            lines.append(f"[[routes.{name}.deployments]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
    return "\n".join(lines) + "\n"


def write_routes(tmp_path: Path, text: str) -> str:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return str(path)


def routed(
    route: str = "chat", text: str = "Say hello", step: str = "", **fields: Any
) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        route=route,
        messages=[chat_pb2.Message(role=USER, content=text)],
        trace=chat_pb2.TraceContext(step_id=step),
        **fields,
    )


def two_deployments(fakes: list[FakeUpstream], cooldown: float = 5.0, **a_fields: Any) -> str:
    # A's weight makes it first (the chance B goes first is 1e-21).
    return routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, **a_fields),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
        },
        cooldown_seconds=cooldown,
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def gateway_with(tmp_path: Path, text: str, **overrides: Any) -> Any:
    settings = make_settings(tmp_path, routes_file=write_routes(tmp_path, text), **overrides)
    return running_gateway(settings)


def router_of(gw: RunningGateway) -> Any:
    running = gw.server._running  # noqa: SLF001 - the test reads the router's health
    assert running is not None
    return running.router


RETRYABLE = {
    "429": Reply(status=429, json_body={"error": {"message": "slow down"}}),
    "500": Reply(status=500, json_body={"error": {"message": "boom"}}),
    "503": Reply(status=503, raw=b"unavailable"),
    "529": Reply(status=529, json_body={"type": "error", "error": {"type": "overloaded_error"}}),
    "context_length": Reply(
        status=400,
        json_body={
            "error": {
                "message": "This model's maximum context length is 8192 tokens.",
                "code": "context_length_exceeded",
            }
        },
    ),
}


@pytest.mark.parametrize("failure", sorted(RETRYABLE))
async def test_each_retryable_class_falls_back(
    tmp_path: Path, fakes: list[FakeUpstream], failure: str
) -> None:
    fakes[0].script(RETRYABLE[failure])
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        response = await gw.chat.Create(routed(step=f"s-{failure}"), timeout=10)
        trace = await wait_for_trace(gw.traces, f"s-{failure}", trace_id=response.provider_trace_id)
    assert response.completion.choices[0].message.content == "Hello!"
    assert (response.deployment.route, response.deployment.name, response.deployment.attempts) == (
        "chat",
        "b",
        2,
    )
    assert response.deployment.model == "model-b"
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
    assert fakes[1].requests[0].body["model"] == "model-b"
    assert fakes[1].requests[0].headers["Authorization"] == f"Bearer {KEY_B}"
    assert (trace.route, trace.deployment) == ("chat", "chat/b")
    assert [(a.deployment, a.status) for a in trace.attempts][-1] == ("chat/b", "OK")
    assert trace.attempts[0].deployment == "chat/a" and trace.attempts[0].status != "OK"
    assert all(a.latency_ms > 0 for a in trace.attempts)


async def test_connect_errors_and_attempt_timeouts_fall_back(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", closed_port_url(), weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e3, timeout_seconds=0.3),
                    deployment("c", fakes[2].base_url, weight=1e-9),
                ],
            )
        }
    )
    fakes[1].script(Reply(hang=True))
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        response = await gw.chat.Create(routed(step="s-ct"), timeout=10)
        elapsed = time.monotonic() - started
        trace = await wait_for_trace(gw.traces, "s-ct", trace_id=response.provider_trace_id)
    assert response.deployment.name == "c"
    assert 0.3 <= elapsed < 5
    assert [(a.deployment, a.status) for a in trace.attempts] == [
        ("chat/a", "UPSTREAM_UNAVAILABLE"),
        ("chat/b", "DEADLINE_EXCEEDED"),
        ("chat/c", "OK"),
    ]


NON_RETRYABLE = {
    "400": (Reply(status=400, json_body={"error": {"message": "bad field"}}), "UPSTREAM_REJECTED"),
    "content_filter": (
        Reply(
            status=400,
            json_body={"error": {"message": "The response was filtered", "code": "content_filter"}},
        ),
        "UPSTREAM_REJECTED",
    ),
    "404": (
        Reply(status=404, json_body={"error": {"code": "model_not_found", "message": "no model"}}),
        "MODEL_NOT_FOUND",
    ),
}


@pytest.mark.parametrize("failure", sorted(NON_RETRYABLE))
async def test_non_retryable_failures_end_the_call(
    tmp_path: Path, fakes: list[FakeUpstream], failure: str
) -> None:
    reply, reason = NON_RETRYABLE[failure]
    fakes[0].script(reply)
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=10)
    d = details(caught.value)
    assert d.reason == reason
    assert (d.metadata["route"], d.metadata["attempts"], d.metadata["deployments"]) == ("chat", "1", "chat/a")
    assert d.metadata["last_error"] == reason
    assert fakes[1].requests == []


async def test_a_route_may_fall_back_on_a_rejection(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    text = two_deployments(fakes).replace(
        "[routes.chat]\n", '[routes.chat]\nfallback_on = ["UPSTREAM_REJECTED"]\n'
    )
    fakes[0].script(NON_RETRYABLE["400"][0])
    async with await gateway_with(tmp_path, text) as gw:
        response = await gw.chat.Create(routed(), timeout=10)
    assert response.deployment.name == "b"


async def test_server_key_refused_is_disabled_until_reload_and_never_logged(
    tmp_path: Path, fakes: list[FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    fakes[0].script(Reply(status=401, json_body={"error": {"message": f"bad key {KEY_A}"}}))
    caplog.set_level(logging.INFO)
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        first = await gw.chat.Create(routed(step="s-auth"), timeout=10)
        second = await gw.chat.Create(routed(), timeout=10)
        trace = await wait_for_trace(gw.traces, "s-auth", trace_id=first.provider_trace_id)
        assert (first.deployment.name, second.deployment.name) == ("b", "b")
        assert len(fakes[0].requests) == 1  # disabled: not tried again
        assert await router_of(gw).reload()
        third = await gw.chat.Create(routed(), timeout=10)
    assert third.deployment.name == "a" and len(fakes[0].requests) == 2
    assert "ROUTE_KEY_A" in caplog.text and "disabled until the routes file is reloaded" in caplog.text
    everything = caplog.text + str(trace) + first.SerializeToString().decode("utf-8", "replace")
    assert KEY_A not in everything and KEY_B not in everything


async def test_byok_auth_failure_ends_the_call(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    import secrets

    from llmgateway.v1 import providers_pb2

    from server.auth.store_sqlite import SqliteAuthStore

    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
        _, other = await store.create_key(organization_id="org-b", user_id="", is_admin=True)
    byok_key = "sk-byok-" + secrets.token_hex(24)
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
    fakes[0].script(Reply(status=401, json_body={"error": {"message": "bad key"}}))
    async with await gateway_with(
        tmp_path,
        text,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(fakes[0].base_url,),
    ) as gw:
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="team", model_endpoint_type="openai", base_url=fakes[0].base_url, api_key=byok_key
            ),
            metadata=(("authorization", f"Bearer {admin}"),),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), metadata=(("authorization", f"Bearer {admin}"),), timeout=10)
        expect(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED")
        assert fakes[1].requests == []
        # Another organization has no provider of that name: its deployment is skipped, never
        # sent org-a's key; the server deployment answers.
        response = await gw.chat.Create(
            routed(), metadata=(("authorization", f"Bearer {other}"),), timeout=10
        )
    assert response.deployment.name == "b"
    assert (
        len(fakes[0].requests) == 1 and fakes[0].requests[0].headers["Authorization"] == f"Bearer {byok_key}"
    )
    assert byok_key not in str(fakes[1].requests[0].headers)


async def test_key_rotation_on_429(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    text = routes_toml(
        {"chat": ({}, [deployment("a", fakes[0].base_url, keys=["ROUTE_KEY_A", "ROUTE_KEY_C"])])}
    )
    fakes[0].script(
        Reply(status=429, headers={"Retry-After": "20"}, json_body={"error": {"message": "rate"}})
    )
    async with await gateway_with(tmp_path, text) as gw:
        response = await gw.chat.Create(routed(step="s-rot"), timeout=10)
        again = await gw.chat.Create(routed(), timeout=10)
        trace = await wait_for_trace(gw.traces, "s-rot", trace_id=response.provider_trace_id)
        cooling = router_of(gw).health.cooling_until("chat/a#ROUTE_KEY_A") - time.monotonic()
    assert [r.headers["Authorization"] for r in fakes[0].requests] == [
        f"Bearer {KEY_A}",
        f"Bearer {KEY_C}",
        f"Bearer {KEY_C}",  # key A cools down for its Retry-After; C carries on
    ]
    assert response.deployment.name == again.deployment.name == "a"
    assert 18 < cooling <= 20
    assert [a.status for a in trace.attempts] == ["RATE_LIMIT_EXCEEDED", "OK"]
    assert KEY_A not in str(trace) and KEY_C not in str(trace)


async def test_a_longer_retry_after_extends_a_cooldown_and_a_shorter_never_shortens_it(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        health = router_of(gw).health
        for first, second, expected in (("2", "30", 30), ("30", "2", 30)):
            health._until.clear()  # noqa: SLF001 - each round starts with nothing cooling
            fakes[0].script(
                Reply(status=429, delay=0.1, headers={"Retry-After": first}, json_body={"error": {}}),
                Reply(status=429, delay=0.4, headers={"Retry-After": second}, json_body={"error": {}}),
            )
            started = time.monotonic()
            # Both calls reach A before either answer: each cools it with its own Retry-After.
            one, two = await asyncio.gather(
                gw.chat.Create(routed(), timeout=10), gw.chat.Create(routed(), timeout=10)
            )
            assert one.deployment.name == two.deployment.name == "b"
            until = health.cooling_until("chat/a#ROUTE_KEY_A") - started  # 429 cools the key
            assert expected - 0.5 < until < expected + 2, (first, second, until)


async def test_all_cooling_down_waits_only_with_deadline_room(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    # A hint longer than max_delay is not slept on: the first call ends at once.
    retry = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=0.5, max_attempts=3)
    for fake in fakes[:2]:
        fake.script(
            Reply(status=429, headers={"Retry-After": "1.5"}, json_body={"error": {"message": "rate"}})
        )
    # No cooldown of our own: the upstreams' Retry-After alone says when they recover.
    async with await gateway_with(tmp_path, two_deployments(fakes, cooldown=0), retry=retry) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=10)
        assert details(caught.value).reason == "RATE_LIMIT_EXCEEDED"
        cooled_at = time.monotonic()
        # No room: RESOURCE_EXHAUSTED at once, RetryInfo = the earliest recovery, nothing sent.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=0.8)
        elapsed = time.monotonic() - started
        d = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
        assert d.retry_delay is not None and 0.5 < d.retry_delay <= 1.5
        assert d.metadata["cooling_down"] == "true"
        assert elapsed < 0.5
        assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
        # Room: the call waits for the earliest recovery, then A answers.
        response = await gw.chat.Create(routed(), timeout=10)
        waited = time.monotonic() - cooled_at
    assert response.deployment.name == "a"
    assert waited >= 1.3
    assert len(fakes[0].requests) == 2


async def test_context_window_skip_and_none_fits(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, context_window=40),
                    deployment("b", fakes[1].base_url, weight=1e-9, context_window=100_000),
                ],
            ),
            "small": (
                {},
                [
                    deployment("a", fakes[0].base_url, context_window=40),
                    deployment("c", fakes[2].base_url, context_window=50),
                ],
            ),
        }
    )
    long_prompt = "word " * 200
    async with await gateway_with(tmp_path, text) as gw:
        response = await gw.chat.Create(routed(text=long_prompt, step="s-ctx"), timeout=10)
        trace = await wait_for_trace(gw.traces, "s-ctx", trace_id=response.provider_trace_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed("small", text=long_prompt), timeout=10)
        counted = await gw.chat.CountTokens(
            chat_pb2.CountTokensRequest(
                route="chat", messages=[chat_pb2.Message(role=USER, content=long_prompt)]
            ),
            timeout=10,
        )
    assert response.deployment.name == "b" and response.deployment.attempts == 1
    assert fakes[0].requests == [] and fakes[2].requests == []
    assert [(a.deployment, a.status) for a in trace.attempts] == [
        ("chat/a", "SKIPPED_CONTEXT_WINDOW"),
        ("chat/b", "OK"),
    ]
    d = expect(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED")
    assert "maximum context length" in d.message
    assert sorted(d.metadata["context_windows"].split(", ")) == ["40", "50"]
    assert int(d.metadata["total_tokens"]) > 50
    # CountTokens counts for the deployment Create tries first (the heaviest healthy one).
    assert counted.context_window == 40 and counted.total_tokens > 200


async def test_stream_falls_back_before_the_first_event_and_never_after(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    fakes[0].script(
        Reply(status=503, raw=b"down"),
        Reply(sse=text_stream(["one", " two", " three"]), break_after=3),
    )
    fakes[1].script(Reply(sse=text_stream(["from", " b"])))
    # No cooldown: the second stream goes to A again.
    async with await gateway_with(tmp_path, two_deployments(fakes, cooldown=0)) as gw:
        events = [e async for e in gw.chat.StreamCreate(routed(), timeout=10)]
        assert events[-1].completion.choices[0].message.content == "from b"
        assert (events[-1].deployment.name, events[-1].deployment.attempts) == ("b", 2)
        received: list[chat_pb2.StreamCreateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in gw.chat.StreamCreate(routed(), timeout=10):
                received.append(event)
    assert received and received[0].HasField("delta")  # the first event went out: no fallback
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fakes[1].requests) == 1  # only the first stream's fallback


async def test_fallbacks_never_outlast_the_callers_deadline(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, timeout_seconds=0.5),
                    deployment("b", fakes[1].base_url, weight=1e3, timeout_seconds=0.5),
                    deployment("c", fakes[2].base_url, weight=1e-9, timeout_seconds=0.5),
                ],
            )
        },
        cooldown_seconds=0,  # the second call tries A and B again
    )
    for fake in fakes:
        fake.default = Reply(hang=True)
    deadline = 1.2
    async with await gateway_with(tmp_path, text) as gw:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=deadline)
        elapsed = time.monotonic() - started
        # Room for every attempt: A and B time out, C answers, all inside the deadline.
        for fake in fakes:
            fake.default = Reply(json_body=completion())
        fakes[0].script(Reply(hang=True))
        fakes[1].script(Reply(hang=True))
        started_ok = time.monotonic()
        response = await gw.chat.Create(routed(), timeout=3.0)
        elapsed_ok = time.monotonic() - started_ok
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < deadline + 0.3, elapsed
    # No attempt started that could not finish before the caller's deadline.
    arrivals = [r.at - started for fake in fakes for r in fake.requests if r.at < started_ok]
    assert len(arrivals) == 3 and max(arrivals) < deadline
    assert response.deployment.name == "c" and 1.0 <= elapsed_ok < 3.0


async def test_unknown_route_is_not_found_with_the_route(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        for call in (gw.chat.Create, gw.chat.CountTokens):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(routed("nope"), timeout=10)
            d = expect(caught.value, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
            assert d.metadata["route"] == "nope"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gw.chat.StreamCreate(routed("nope"), timeout=10):
                pass
        expect(caught.value, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


async def test_inline_fallbacks_without_a_route(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    fakes[0].script(Reply(status=502, raw=b"bad gateway"))
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="m0", model_endpoint_type="openai", model_endpoint=fakes[0].base_url
        ),
        fallbacks=[
            chat_pb2.LLMConfig(model="m1", model_endpoint_type="openai", model_endpoint=fakes[1].base_url)
        ],
        messages=[chat_pb2.Message(role=USER, content="hi")],
    )
    settings = make_settings(tmp_path, allowed_endpoints=(fakes[0].base_url, fakes[1].base_url))
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(request, timeout=10)
    assert (response.deployment.route, response.deployment.name, response.deployment.model) == (
        "",
        "fallbacks[0]",
        "m1",
    )
    assert fakes[1].requests[0].body["model"] == "m1"
    assert len(fakes[0].requests) == 1  # one attempt, then the fallback (no retry sleeps)
