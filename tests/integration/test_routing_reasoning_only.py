"""A routed call whose deployment answers only reasoning (UPSTREAM_BAD_RESPONSE, cause
reasoning_only): the model's output, not the deployment's health, so nothing cools down, as for
TOOL_CALL_MISSING. Like TOOL_CALL_MISSING (and an answer over LLMGW_MAX_ANSWER_BYTES) it ends the
call, unless the route lists UPSTREAM_BAD_RESPONSE in `fallback_on`; an unreadable answer still
falls back and cools its deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.integration.test_errors_support import details
from tests.integration.test_routing_e2e import (
    KEYS,
    deployment,
    gateway_with,
    routed,
    router_of,
    routes_toml,
    two_deployments,
)

THOUGHT = "The user said hello. I should greet them back."


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


def reasoning_only_answer() -> dict[str, Any]:
    body = completion(None)
    body["choices"][0]["message"]["reasoning"] = THOUGHT  # vLLM's, content null, finish stop
    return body


# Gemini's answer of only thoughts (server.providers.gemini), the same cause.
GEMINI_THOUGHTS_ONLY = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": THOUGHT, "thought": True}]}, "finishReason": "STOP"}
    ],
    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 9, "totalTokenCount": 14},
    "modelVersion": "gemini-2.5-flash",
}


def routes_for(provider: str, fakes: list[FakeUpstream]) -> str:
    if provider == "openai":
        return two_deployments(fakes)
    a = deployment("a", fakes[0].base_url, provider="google_ai", model="gemini-2.5-flash", weight=1e12)
    return routes_toml(
        {"chat": ({}, [a, deployment("b", fakes[1].base_url, weight=1e-9)])}, cooldown_seconds=5
    )


def fallback_on_bad_response(text: str) -> str:
    return text.replace("[routes.chat]\n", '[routes.chat]\nfallback_on = ["UPSTREAM_BAD_RESPONSE"]\n')


@pytest.mark.parametrize("provider", ["openai", "google_ai"])
async def test_a_reasoning_only_answer_ends_the_call_and_cools_nothing(
    tmp_path: Path, fakes: list[FakeUpstream], provider: str
) -> None:
    thoughts = reasoning_only_answer() if provider == "openai" else GEMINI_THOUGHTS_ONLY
    fakes[0].script(Reply(json_body=thoughts))
    async with await gateway_with(tmp_path, routes_for(provider, fakes)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(), timeout=10)
        cooling = [router_of(gw).health.cooling_until(unit) for unit in ("chat/a", "chat/a#ROUTE_KEY_A")]
        fakes[0].script(Reply(json_body=thoughts))
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await gw.chat.Create(routed(), timeout=10)  # A is still the first choice
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    d = details(caught.value)
    assert (d.reason, d.metadata["cause"]) == ("UPSTREAM_BAD_RESPONSE", "reasoning_only")
    assert (d.metadata["attempts"], d.metadata["deployments"]) == ("1", "chat/a")
    assert details(again.value).metadata["deployments"] == "chat/a"
    assert fakes[1].requests == [] and len(fakes[0].requests) == 2
    assert cooling == [0.0, 0.0]


async def test_a_route_falling_back_on_bad_responses_tries_the_next_without_cooling(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    fakes[0].script(Reply(json_body=reasoning_only_answer()))
    async with await gateway_with(tmp_path, fallback_on_bad_response(two_deployments(fakes))) as gw:
        response = await gw.chat.Create(routed(), timeout=10)
        cooling = router_of(gw).health.cooling_until("chat/a")
    assert (response.deployment.name, response.deployment.attempts) == ("b", 2)
    assert response.completion.choices[0].message.content == "Hello!"
    assert cooling == 0.0


async def test_a_missing_tool_call_is_handled_alike(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    # TOOL_CALL_MISSING, the other "the model's output is not what was promised" error: ends the
    # call, nothing cools down (it cannot be listed in fallback_on).
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"q": {"type": "string"}}})
    search = chat_pb2.FunctionDefinition(name="search", description="search", parameters=params)
    fakes[0].script(Reply(json_body=completion("I would rather not search.")))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(routed(functions=[search], function_call="required"), timeout=10)
        cooling = router_of(gw).health.cooling_until("chat/a")
    assert details(caught.value).reason == "TOOL_CALL_MISSING"
    assert fakes[1].requests == []
    assert cooling == 0.0


async def test_an_unreadable_answer_still_falls_back_and_cools(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    fakes[0].script(Reply(raw=b"<html>Login</html>", content_type="text/html"))
    async with await gateway_with(tmp_path, two_deployments(fakes)) as gw:
        response = await gw.chat.Create(routed(), timeout=10)
        cooling = router_of(gw).health.cooling_until("chat/a")
    assert response.deployment.name == "b"
    assert cooling > 0.0
