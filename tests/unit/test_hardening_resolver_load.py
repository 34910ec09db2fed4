"""A tenant controls its BYOK host's DNS: slow lookups of many names must not take every
resolver thread from the operator's own endpoints, and a burst of calls to one new name makes
one lookup, not one each."""

from __future__ import annotations

import asyncio
import socket

from server.auth.resolver import TENANT_LOOKUPS, Address, SafeResolver


class BlockingLookup:
    """Names ending in `.slow.test` hang until released; others answer at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most = 0
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls.append(host)
        if not host.endswith(".slow.test"):
            return [(socket.AF_INET, "127.0.0.1")]
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return [(socket.AF_INET, "93.184.216.34")]


async def test_slow_tenant_lookups_are_bounded_and_do_not_block_operator_lookups() -> None:
    lookup = BlockingLookup()
    resolver = SafeResolver(lookup)
    tenants = [
        asyncio.ensure_future(resolver.resolve(f"n{i}.slow.test", 443)) for i in range(TENANT_LOOKUPS * 3)
    ]
    async with asyncio.timeout(5):
        while lookup.in_flight < TENANT_LOOKUPS:
            await asyncio.sleep(0)
        # The operator's endpoint resolves while every tenant slot is taken.
        assert await resolver.resolve("vllm.internal", 8000, private_ok=True) == [
            (socket.AF_INET, "127.0.0.1")
        ]
    assert lookup.most == TENANT_LOOKUPS
    lookup.release.set()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*tenants)
    assert all(r == [(socket.AF_INET, "93.184.216.34")] for r in results)
    assert lookup.most == TENANT_LOOKUPS


async def test_concurrent_resolves_of_one_name_share_one_lookup() -> None:
    lookup = BlockingLookup()
    resolver = SafeResolver(lookup)
    calls = [asyncio.ensure_future(resolver.resolve("same.slow.test", 443)) for _ in range(20)]
    async with asyncio.timeout(5):
        while lookup.in_flight < 1:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        lookup.release.set()
        results = await asyncio.gather(*calls)
    assert lookup.calls == ["same.slow.test"]
    assert len(results) == 20 and all(r == results[0] for r in results)


async def test_a_cancelled_waiter_does_not_cancel_the_shared_lookup() -> None:
    lookup = BlockingLookup()
    resolver = SafeResolver(lookup)
    first = asyncio.ensure_future(resolver.resolve("shared.slow.test", 443))
    second = asyncio.ensure_future(resolver.resolve("shared.slow.test", 443))
    async with asyncio.timeout(5):
        while lookup.in_flight < 1:
            await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        lookup.release.set()
        assert await second == [(socket.AF_INET, "93.184.216.34")]
    assert lookup.calls == ["shared.slow.test"]
