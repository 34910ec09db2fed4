"""Create asks whether a request is routed once (the servicer tells the gateway) and whether its
function set goes off the loop once (`_create` tells `_plan`); asked again when not told, the
answers, and so where each call goes, are the same."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from llmgateway.v1 import chat_pb2

from server.api.chat import ChatCompletionServicer
from server.core import validation
from server.gateway import Gateway
from server.routing.router import wants_routing


def _requests() -> list[chat_pb2.CreateRequest]:
    plain = chat_pb2.CreateRequest()
    plain.llm_config.model = "m"
    plain.llm_config.model_endpoint_type = "openai"
    routed = chat_pb2.CreateRequest()
    routed.CopyFrom(plain)
    routed.route = "r"
    fallbacks = chat_pb2.CreateRequest()
    fallbacks.CopyFrom(plain)
    fallbacks.fallbacks.add(model="n", model_endpoint_type="openai")
    both = chat_pb2.CreateRequest()
    both.CopyFrom(routed)
    both.fallbacks.add(model="n", model_endpoint_type="openai")
    return [plain, routed, fallbacks, both]


class _Router:
    def __init__(self) -> None:
        self.calls = 0

    async def create(self, *args: Any) -> str:
        self.calls += 1
        return "routed"


def _gateway(limiter: Any = None) -> tuple[Gateway, _Router]:
    gateway = Gateway.__new__(Gateway)
    router = _Router()
    gateway.deps = cast(Any, SimpleNamespace(limiter=limiter))
    gateway.router = cast(Any, router)

    async def direct(*args: Any) -> str:
        return "direct"

    gateway._create = direct  # type: ignore[method-assign]
    return gateway, router


@pytest.mark.parametrize("request_index", range(4))
async def test_told_or_not_the_gateway_routes_exactly_the_requests_that_want_it(request_index: int) -> None:
    request = _requests()[request_index]
    expected = "routed" if wants_routing(request) else "direct"
    for told in (None, wants_routing(request)):
        gateway, router = _gateway()
        got = await gateway.create(request, cast(Any, None), cast(Any, None), routed=told)
        assert got == expected
        assert router.calls == (expected == "routed")
    assert [wants_routing(r) for r in _requests()] == [False, True, True, True]


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> Any:
        return None


class _Auth:
    async def actor_for(self, context: Any) -> Any:
        return "actor"


async def test_the_servicer_tells_the_gateway_what_wants_routing_says() -> None:
    told: list[bool | None] = []

    class _Spy:
        async def create(self, request: Any, actor: Any, deadline: Any, *, routed: bool | None = None) -> Any:
            told.append(routed)
            return chat_pb2.CreateResponse()

    servicer = ChatCompletionServicer(cast(Any, _Spy()), cast(Any, _Auth()))
    for request in _requests():
        await servicer.create(request.SerializeToString(), cast(Any, _Context()))
    assert told == [wants_routing(r) for r in _requests()] == [False, True, True, True]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("huge", [False, True])
async def test_create_asks_off_loop_once_and_tells_the_plan_its_answer(
    huge: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either side of the bound: validation goes to the pool exactly when the set is huge, and
    `_plan` is told that same answer (it asks `off_loop` itself only when not told)."""
    import server.gateway as gateway_module

    size = validation.OFFLOAD_FUNCTION_BYTES if huge else 10
    function = chat_pb2.FunctionDefinition(name="f", description="x" * size)
    assert validation.off_loop((function.SerializeToString(),)) is huge
    asked: list[bool] = []

    def counting(keys: validation.FunctionKeys) -> bool:
        asked.append(validation.off_loop(keys))
        return asked[-1]

    told: list[Any] = []
    pooled: list[bool] = []

    async def plan(self: Gateway, request: Any, actor: Any, **kwargs: Any) -> Any:
        told.append(kwargs.get("off"))
        raise _Stop

    async def run(fn: Any) -> Any:
        pooled.append(True)
        return fn()

    monkeypatch.setattr(gateway_module, "off_loop", counting)
    monkeypatch.setattr(Gateway, "_plan", plan)
    monkeypatch.setattr(gateway_module, "validate_request", lambda *args: None)
    monkeypatch.setattr(gateway_module.offload, "run", run)
    request = chat_pb2.CreateRequest()
    request.llm_config.model_endpoint_type = "openai"
    request.functions.append(function)
    gateway = Gateway.__new__(Gateway)
    with pytest.raises(_Stop):
        await gateway._create(request, cast(Any, None), cast(Any, None), None, None)
    assert asked == [huge]  # once, for validation
    assert told == [huge]  # the plan was told the same answer
    assert pooled == ([True] if huge else [])
