"""Connection-time refusal of forbidden addresses (server.auth.resolver)."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from server.auth.resolver import ForbiddenAddressError, SafeResolver


class StaticResolver(AbstractResolver):
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        self.closed = True


async def test_drops_forbidden_addresses() -> None:
    resolver = SafeResolver(StaticResolver(["169.254.169.254", "93.184.216.34", "fe80::1"]))
    results = await resolver.resolve("rebind.example", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"]


@pytest.mark.parametrize("addresses", [["169.254.169.254"], ["fd00:ec2::254", "::ffff:169.254.169.254"]])
async def test_only_forbidden_addresses_raise(addresses: list[str]) -> None:
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(StaticResolver(addresses)).resolve("rebind.example", 80)


async def test_forbidden_name_is_never_looked_up() -> None:
    inner = StaticResolver(["8.8.8.8"])
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(inner).resolve("Metadata.Google.Internal.", 80)
    await SafeResolver(inner).close()
    assert inner.closed


async def test_loopback_still_resolves() -> None:
    results = await SafeResolver(StaticResolver(["127.0.0.1"])).resolve("localhost", 11434)
    assert results[0]["host"] == "127.0.0.1"
