"""Routing cooldowns shared through a real Redis (server/routing/shared_cooldowns.py) by real
gateway processes: a deployment that failed on one replica is skipped by the others, for as
long as its Retry-After said, also by a replica started later; a shorter cooldown never
shortens a longer one; with Redis gone each replica still cools down on its own, says so in
its log, and shares again once Redis is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2_grpc

from server.routing.health import Health
from server.routing.shared_cooldowns import PREFIX, SharedCooldowns
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.test_routing_e2e import KEYS, deployment, routed, routes_toml
from tests.process_harness import ServerProcess, async_server_process
from tests.redis_service import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RETRY_AFTER = 30  # seconds the failing upstream asks for; the deployments' own cooldown is 1 s


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


def _routes(tmp_path: Path, fakes: list[FakeUpstream]) -> Path:
    # `bad` first (its weight), `good` answers when it is skipped or failed.
    text = routes_toml(
        {
            route: (
                {},
                [
                    deployment("a", bad.base_url, weight=1e12),
                    deployment("b", fakes[1].base_url, weight=1e-9),
                ],
            )
            for route, bad in (("chat", fakes[0]), ("other", fakes[2]))
        },
        cooldown_seconds=1,
    )
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return path


async def _answered_by(server: ServerProcess, route: str) -> str:
    async with grpc.aio.insecure_channel(server.address) as channel:
        answer = await chat_pb2_grpc.ChatCompletionServiceStub(channel).Create(routed(route), timeout=20)
        return str(answer.deployment.name)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _failing() -> Reply:
    return Reply(
        status=503, json_body={"error": {"message": "overloaded"}}, headers={"Retry-After": str(RETRY_AFTER)}
    )


async def test_a_deployment_cooled_on_one_replica_is_skipped_by_every_other(
    tmp_path: Path, fakes: list[FakeUpstream], redis_server: RedisServer
) -> None:
    env = {"LLMGW_REDIS_URL": redis_server.url, "LLMGW_ROUTES_FILE": str(_routes(tmp_path, fakes)), **KEYS}
    kwargs = {"allowed_endpoints": [f.base_url for f in fakes], "env": env}
    fakes[0].script(_failing())
    async with AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            *(stack.enter_async_context(async_server_process(tmp_path / n, **kwargs)) for n in "ab")
        )
        assert await _answered_by(a, "chat") == "b"  # a failed with 503 Retry-After 30, b answered
        assert len(fakes[0].requests) == 1
        client = redis_server.client()
        # Written a few milliseconds after the failure (batched, off the request path).
        await _until(lambda: client.pttl(PREFIX + "chat/a") > 0, 5, "the cooldown is in Redis")
        left = client.pttl(PREFIX + "chat/a")
        assert (RETRY_AFTER - 2) * 1000 < left <= RETRY_AFTER * 1000, left  # the Retry-After, not 1 s
        # Past the deployment's own 1 s cooldown: only the shared Retry-After keeps `a` out.
        await asyncio.sleep(1.5)
        assert [await _answered_by(b, "chat") for _ in range(3)] == ["b"] * 3
        # A replica started while `a` cools reads the cooldown from Redis when it connects.
        c = await stack.enter_async_context(async_server_process(tmp_path / "c", **kwargs))
        assert await _answered_by(c, "chat") == "b"
        assert len(fakes[0].requests) == 1, "a replica sent a call to the deployment cooling down"
        # The route not cooled is untouched everywhere (the cooldown is per deployment).
        assert await _answered_by(b, "other") == "a"
        assert client.pttl(PREFIX + "chat/a") <= left


async def test_a_shorter_cooldown_never_shortens_a_longer_one(redis_server: RedisServer) -> None:
    """Two replicas' SharedCooldowns (one process, the real Redis): 30 s from one, then 1 s from
    the other, leaves 30 s in Redis and on both."""
    one, two = Health(), Health()
    first, second = SharedCooldowns(redis_server.url, one), SharedCooldowns(redis_server.url, two)
    first.start()
    second.start()
    try:
        await asyncio.wait_for(asyncio.gather(first.connected.wait(), second.connected.wait()), 10)
        one.cool("chat/a", 30)
        await _until(lambda: two.cooling_until("chat/a") > 0, 5, "the cooldown reached the other replica")
        assert two.cooling_until("chat/a") - two.clock() > 29
        two.cool("chat/a", 1)  # kept locally as 30 s: nothing lengthened, nothing published
        two.cool("chat/b", 1)
        await _until(lambda: one.cooling_until("chat/b") > 0, 5, "chat/b reached the first replica")
        assert redis_server.client().pttl(PREFIX + "chat/a") > 29_000
        assert one.cooling_until("chat/a") - one.clock() > 29
        # The script itself never shortens, whoever writes: 1 s over 30 s is refused by Redis too.
        second.share("chat/a", 1)
        await second.flush()
        assert redis_server.client().pttl(PREFIX + "chat/a") > 29_000
        # A published line that is not a cooldown is ignored; a unit too long is not stored.
        second.apply(b"garbage")
        second.apply(f"1000 {'x' * 600}")
        assert two.cooling_until("x" * 600) == 0.0
    finally:
        await first.close()
        await second.close()


async def test_without_redis_cooldowns_stay_local_and_are_shared_again_when_it_is_back(
    tmp_path: Path, fakes: list[FakeUpstream], redis_server: RedisServer
) -> None:
    env = {"LLMGW_REDIS_URL": redis_server.url, "LLMGW_ROUTES_FILE": str(_routes(tmp_path, fakes)), **KEYS}
    kwargs = {"allowed_endpoints": [f.base_url for f in fakes], "env": env}
    async with AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            *(stack.enter_async_context(async_server_process(tmp_path / n, **kwargs)) for n in "ab")
        )
        redis_server.kill()
        fakes[0].script(_failing(), _failing())
        # Calls keep working; `a` is cooled on each replica by its own failure only.
        assert await _answered_by(a, "chat") == "b"
        assert await _answered_by(a, "chat") == "b"
        assert len(fakes[0].requests) == 1  # a's local cooldown holds
        assert await _answered_by(b, "chat") == "b"
        assert len(fakes[0].requests) == 2  # b did not hear of it: Redis is down
        for server in (a, b):
            await _until(
                lambda s=server: "routing cooldowns: Redis unavailable" in s.log, 10, "the warning is logged"
            )
        redis_server.start()
        waited = await _until(
            lambda: all("cooldowns are shared again" in s.log for s in (a, b)), 20, "both reconnect"
        )
        fakes[2].script(_failing())
        assert await _answered_by(a, "other") == "b"
        await _until(lambda: redis_server.client().pttl(PREFIX + "other/a") > 0, 5, "other/a in Redis")
        await asyncio.sleep(0.2)  # the published cooldown reaches b
        assert await _answered_by(b, "other") == "b"
        assert len(fakes[2].requests) == 1
        print(f"\nshared cooldowns: both replicas subscribed again {waited:.1f} s after Redis came back")
