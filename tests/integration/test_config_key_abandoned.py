"""A pool job outliving its attempt never files one config's result under another's key.

A routed stream's attempt cut by its deployment's `timeout_seconds` leaves a pool job already
running (a huge function set is validated and converted in `server.core.offload`'s pool, and a
running job cannot be stopped), and the router's next attempt rewrites `request.llm_config` in
place. A job that reads the config after that must key what it caches by the config it read, not
by the bytes its attempt serialized on the loop before it started: else the caches keyed by the
config's bytes (validation's, the body's) hand the next attempt's config (here the caller's own
inline fallback) to every later call whose config is the first attempt's.

The wrapper below holds the first attempt's job until the next attempt has begun, as a worker
thread waiting for the GIL while the loop runs the timeout and the next attempt would: at the job's
start (past the loop's serialization of the config, which h/unary's key sharing handed to the job)
or inside the cache fill, between its own serialization and its reading of the config (main's
narrower window). Each cache keeps a result only if the config still serializes to its key.

And the plain case: each attempt of a routed unary call on the route's deployments sends,
validates and traces its own config (the router sets the deployment's fields in place)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from server import gateway as gateway_module
from server.core import openai_request, validation
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.integration.test_config_key import _queued
from tests.integration.test_request_head import _functions
from tests.integration.test_routing_e2e import KEYS, deployment, gateway_with, routed, routes_toml

USER = chat_pb2.ROLE_USER


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream() for _ in range(2)]
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


def _route_a(fakes: list[FakeUpstream]) -> str:
    # One deployment with a timeout; the request's inline fallback comes after it.
    return routes_toml(
        {"chat": ({}, [deployment("a", fakes[0].base_url, timeout_seconds=0.3)])}, cooldown_seconds=0
    )


# Where the first attempt's pool job is held: at its start (the window the loop-made key opened),
# or between the cache's own serialization and its reading of the config (main's narrower one).
HOLDS: dict[str, tuple[ModuleType, str]] = {
    "validate_job": (gateway_module, "validate_request"),
    "body_job": (gateway_module, "build_chat_body"),
    "config_checks": (validation, "_check_config"),
    "config_body": (openai_request, "_config_body"),
}


def _hold_first_pool_call(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> threading.Event:
    """Hold the first call of module.`name` made in a pool thread until the router has rewritten
    the config it was given (the next attempt has begun); the returned event is set once that
    call has finished. (Polled, so the held job needs no second pool thread for the next one.)"""
    loop_thread = threading.get_ident()
    real: Callable[..., Any] = getattr(module, name)
    first_done = threading.Event()
    pool_calls = 0

    def held(*args: Any, **kwargs: Any) -> Any:
        nonlocal pool_calls
        if threading.get_ident() != loop_thread:
            pool_calls += 1
            if pool_calls == 1:
                config = args[0].llm_config if hasattr(args[0], "llm_config") else args[0]
                first = config.model
                until = time.monotonic() + 10
                while config.model == first and time.monotonic() < until:
                    time.sleep(0.005)
                try:
                    return real(*args, **kwargs)
                finally:
                    first_done.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return first_done


def _assert_caches_match_their_keys() -> None:
    # (On the loop's thread: the held wrappers pass its calls straight through.)
    for key, checks in list(validation._CONFIG_CHECKS.items()):
        assert checks == validation._check_config(chat_pb2.LLMConfig.FromString(key))
    for (key, endpoint), facts in list(openai_request._CONFIG_BODIES.items()):
        assert facts == openai_request._config_body(chat_pb2.LLMConfig.FromString(key), endpoint)


@pytest.mark.parametrize("hold", list(HOLDS))
async def test_an_abandoned_attempts_pool_job_caches_nothing_under_its_stale_key(
    tmp_path: Path, fakes: list[FakeUpstream], monkeypatch: pytest.MonkeyPatch, hold: str
) -> None:
    first_done = _hold_first_pool_call(monkeypatch, *HOLDS[hold])
    validating = hold in ("validate_job", "config_checks")
    # The fallback: invalid where validation's cache is attacked, another model where the body's is.
    fallback = chat_pb2.LLMConfig(
        model="caller-model", model_endpoint_type="openai", model_endpoint=fakes[1].base_url
    )
    if validating:
        fallback.temperature = 5.0
    else:
        fakes[1].script(Reply(sse=text_stream(["from", " fallback"])))
    generation = chat_pb2.LLMConfig(temperature=0.5)  # the caller's parameters: A's config keeps them
    huge = routed(step="s-huge", llm_config=generation, fallbacks=[fallback], functions=_functions(120, 24))
    assert validation.off_loop(validation.function_keys(huge.functions))
    huge.function_call = "auto"
    allowed = (fakes[0].base_url, fakes[1].base_url)
    async with await gateway_with(tmp_path, _route_a(fakes), allowed_endpoints=allowed) as gw:
        if validating:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [e async for e in gw.chat.StreamCreate(huge, timeout=10)]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "llm_config.temperature" in (caught.value.details() or "")
        else:
            events = [e async for e in gw.chat.StreamCreate(huge, timeout=10)]
            assert events[-1].completion.choices[0].message.content == "from fallback"
            assert events[-1].deployment.name == "fallbacks[0]"
        assert fakes[0].requests == []  # A's attempt was cut before it sent anything
        assert await asyncio.to_thread(first_done.wait, 10)  # A's job has run, on the fallback's config
        # Another caller, the same parameters, the same deployment: A's config, byte for byte.
        fakes[0].script(Reply(sse=text_stream(["from", " a"])))
        plain = routed(step="s-plain", llm_config=chat_pb2.LLMConfig(temperature=0.5))
        events = [e async for e in gw.chat.StreamCreate(plain, timeout=10)]
    assert events[-1].completion.choices[0].message.content == "from a"
    sent = fakes[0].requests[-1].body
    assert (sent.get("model"), sent.get("temperature")) == ("model-a", 0.5)
    _assert_caches_match_their_keys()


async def test_each_route_deployment_of_a_unary_call_sends_and_traces_its_own_config(
    tmp_path: Path, fakes: list[FakeUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The router sets each deployment's fields on the request's config in place, attempt after
    # attempt: each attempt's body, validation and trace are of its own config, not the first's.
    records = _queued(monkeypatch)
    text = routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, weight=1e12, context_window=8000),
                    deployment("b", fakes[1].base_url, weight=1e-9, context_window=16000),
                ],
            )
        },
        cooldown_seconds=0,
    )
    fakes[0].script(Reply(status=502, raw=b"bad gateway"))
    fakes[1].script(Reply(json_body=completion("from b")))
    request = routed(step="s-unary", llm_config=chat_pb2.LLMConfig(temperature=0.5))
    async with await gateway_with(tmp_path, text) as gw:
        response = await gw.chat.Create(request, timeout=10)
    assert response.completion.choices[0].message.content == "from b"
    assert (response.deployment.name, response.deployment.attempts) == ("b", 2)
    sent = [(f.requests[0].body["model"], f.requests[0].body["temperature"]) for f in fakes]
    assert sent == [("model-a", 0.5), ("model-b", 0.5)]
    traced = [json.loads(r.llm_config_json) for r in records]
    assert [(t["model"], t["modelEndpoint"], t["contextWindow"], t["temperature"]) for t in traced] == [
        ("model-a", fakes[0].base_url, 8000, 0.5),
        ("model-b", fakes[1].base_url, 16000, 0.5),
    ]
