"""Limits shared in a real Redis: three gateway processes, one limit; Redis killed mid-test.

The counters are Debian's redis-server on a loopback port (tests/redis_service.py). What
counts is what the fake upstream saw: never more calls than a limit allows, across replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2_grpc

from server.auth.store_sqlite import SqliteAuthStore
from server.limits.book import LimitsBook
from server.limits.limiter import Limiter
from server.limits.model import Limits
from server.limits.redis_counters import RedisCounters
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.process_harness import async_server_process
from tests.redis_service import RedisServer

pytestmark = pytest.mark.timeout(120)


async def key_with_limits(db: Path, org: str, limits: Limits, *, on: str = "key") -> str:
    async with SqliteAuthStore(path=str(db)) as store:
        key_id, token = await store.create_key(organization_id=org)
        await LimitsBook(store).set(on, key_id if on == "key" else org, limits)  # type: ignore[arg-type]
    return token


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def within_one_minute() -> None:
    """Start a per-minute test early in a UTC minute, so its window does not roll mid-test."""
    second = datetime.now(UTC).second
    if second > 40:
        await asyncio.sleep(61 - second)


async def outcome(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        expect(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        return "refused"
    return "ok"


async def test_three_servers_share_one_requests_per_minute_limit(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    db = tmp_path / "shared.db"
    token = await key_with_limits(db, "acme", Limits(requests_per_minute=6))
    env = {"LLMGW_REDIS_URL": redis_server.url, "LLMGW_AUTH": "required"}
    upstream.script(*(Reply(json_body=completion(), delay=0.3) for _ in range(30)))
    kwargs = {"allowed_endpoints": (upstream.base_url,), "sqlite_path": db, "env": env}
    async with (
        async_server_process(tmp_path / "a", **kwargs) as a,
        async_server_process(tmp_path / "b", **kwargs) as b,
        async_server_process(tmp_path / "c", **kwargs) as c,
    ):
        await within_one_minute()
        channels = [grpc.aio.insecure_channel(s.address) for s in (a, b, c)]
        try:
            stubs = [chat_pb2_grpc.ChatCompletionServiceStub(ch) for ch in channels]
            request = chat_request(upstream.base_url, model="gpt-4o")
            calls = [stubs[i % 3].Create(request, metadata=bearer(token), timeout=30) for i in range(30)]
            results = await asyncio.gather(*(outcome(call) for call in calls))
        finally:
            for ch in channels:
                await ch.close()
    assert results.count("ok") == 6
    assert len(upstream.requests) == 6  # 30 calls at once on three replicas, exactly the limit upstream


async def test_three_servers_share_tokens_per_minute(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    db = tmp_path / "shared.db"
    token = await key_with_limits(db, "acme", Limits(tokens_per_minute=100), on="org")
    env = {"LLMGW_REDIS_URL": redis_server.url, "LLMGW_AUTH": "required"}
    usage = {"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20}
    upstream.script(*(Reply(json_body=completion(usage=usage)) for _ in range(12)))
    kwargs = {"allowed_endpoints": (upstream.base_url,), "sqlite_path": db, "env": env}
    async with (
        async_server_process(tmp_path / "a", **kwargs) as a,
        async_server_process(tmp_path / "b", **kwargs) as b,
        async_server_process(tmp_path / "c", **kwargs) as c,
    ):
        await within_one_minute()
        channels = [grpc.aio.insecure_channel(s.address) for s in (a, b, c)]
        try:
            stubs = [chat_pb2_grpc.ChatCompletionServiceStub(ch) for ch in channels]
            request = chat_request(upstream.base_url, model="gpt-4o")
            results = []
            for i in range(8):
                # Each call settles 20 tokens; a replica sends its settles within 50 ms.
                results.append(
                    await outcome(stubs[i % 3].Create(request, metadata=bearer(token), timeout=10))
                )
                await asyncio.sleep(0.2)
        finally:
            for ch in channels:
                await ch.close()
    # 5 x 20 = 100 tokens: the sixth call finds the organization's minute full, on any replica.
    assert results == ["ok"] * 5 + ["refused"] * 3
    assert len(upstream.requests) == 5
    client = redis_server.client()
    try:
        minute = int(time.time() // 60)
        values = [client.get(f"llmgw:limit:org:acme:tokens_per_minute:{m}") for m in (minute, minute - 1)]
        assert 100 in [int(v) for v in values if v is not None]
    finally:
        client.close()


async def in_process_calls(
    count: int, stub: chat_pb2_grpc.ChatCompletionServiceStub, token: str, base: str
) -> list[str]:
    out = []
    for _ in range(count):
        try:
            await stub.Create(chat_request(base, model="gpt-4o"), metadata=bearer(token), timeout=10)
            out.append("ok")
        except grpc.aio.AioRpcError as exc:
            out.append(f"{exc.code().name}")
    return out


def limiter(server: object) -> Limiter:
    gateway = server.gateway  # type: ignore[attr-defined]
    assert gateway is not None and gateway.deps.limiter is not None
    return gateway.deps.limiter  # type: ignore[no-any-return]


async def test_redis_killed_fail_open_admits_with_a_warning(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, auth="required", allowed_endpoints=(upstream.base_url,), redis_url=redis_server.url
    )
    token = await key_with_limits(Path(settings.sqlite_path), "acme", Limits(requests_per_minute=2))
    async with running_gateway(settings) as gw:
        await within_one_minute()
        assert await in_process_calls(1, gw.chat, token, upstream.base_url) == ["ok"]
        counters = limiter(gw.server).counters
        assert isinstance(counters, RedisCounters)
        # On a loaded machine the first admission can already miss the 0.5 s socket timeout
        # (admitted unchecked, counted): what the kill adds is counted from here.
        before = counters.failures
        redis_server.kill()
        # Redis away, policy open (the default): admitted unchecked, counted, warned about.
        assert await in_process_calls(3, gw.chat, token, upstream.base_url) == ["ok"] * 3
        assert counters.failures - before == 3
        assert any(
            "Redis unavailable" in r.getMessage() and "fail open" in r.getMessage() for r in caplog.records
        )
        assert len(upstream.requests) == 4
        # Back (empty): limits apply again, with no restart of the gateway.
        redis_server.start()
        assert await in_process_calls(3, gw.chat, token, upstream.base_url) == [
            "ok",
            "ok",
            "RESOURCE_EXHAUSTED",
        ]
        assert len(upstream.requests) == 6


async def test_redis_killed_fail_closed_refuses_and_sends_nothing(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    settings = make_settings(
        tmp_path,
        auth="required",
        allowed_endpoints=(upstream.base_url,),
        redis_url=redis_server.url,
        limits_redis_failure="closed",
    )
    token = await key_with_limits(Path(settings.sqlite_path), "acme", Limits(requests_per_minute=100))
    async with running_gateway(settings) as gw:
        assert await in_process_calls(1, gw.chat, token, upstream.base_url) == ["ok"]
        redis_server.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.chat.Create(
                chat_request(upstream.base_url, model="gpt-4o"), metadata=bearer(token), timeout=10
            )
        d = expect(info.value, grpc.StatusCode.UNAVAILABLE, "LIMITS_UNAVAILABLE")
        assert d.retry_infos and d.retry_infos[0].retry_delay.seconds == 1
        assert len(upstream.requests) == 1  # the refused call sent nothing
        # A key without limits is not affected: its calls never ask Redis.
        async with SqliteAuthStore(path=settings.sqlite_path) as store:
            _, free = await store.create_key(organization_id="other")
        assert await in_process_calls(1, gw.chat, free, upstream.base_url) == ["ok"]
        redis_server.start()
        assert await in_process_calls(1, gw.chat, token, upstream.base_url) == ["ok"]


async def test_one_round_trip_per_admission_and_batched_settles(
    tmp_path: Path, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    settings = make_settings(
        tmp_path, auth="required", allowed_endpoints=(upstream.base_url,), redis_url=redis_server.url
    )
    token = await key_with_limits(
        Path(settings.sqlite_path), "acme", Limits(requests_per_minute=1000, tokens_per_minute=10**6)
    )
    async with running_gateway(settings) as gw:
        counters = limiter(gw.server).counters
        assert isinstance(counters, RedisCounters)
        request = chat_request(upstream.base_url, model="gpt-4o")
        calls: Sequence[object] = [
            gw.chat.Create(request, metadata=bearer(token), timeout=10) for _ in range(40)
        ]
        await asyncio.gather(*calls)  # type: ignore[arg-type]
        await counters.flush()
        # 40 admissions (one EVALSHA each) and a handful of settle pipelines for all 40 calls.
        assert 40 < counters.round_trips <= 40 + 10, counters.round_trips
