"""Connection-time refusal of forbidden addresses (server.auth.resolver)."""

from __future__ import annotations

import socket

import pytest

from server.auth.resolver import Address, ForbiddenAddressError, SafeResolver


class StaticLookup:
    """Answers every name with fixed addresses and counts the lookups."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls += 1
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in self.addresses]


async def test_drops_forbidden_addresses() -> None:
    resolver = SafeResolver(StaticLookup(["169.254.169.254", "93.184.216.34", "fe80::1"]))
    assert await resolver.resolve("rebind.example", 443) == [(socket.AF_INET, "93.184.216.34")]


@pytest.mark.parametrize("addresses", [["169.254.169.254"], ["fd00:ec2::254", "::ffff:169.254.169.254"]])
async def test_only_forbidden_addresses_raise(addresses: list[str]) -> None:
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(StaticLookup(addresses)).resolve("rebind.example", 80)


async def test_forbidden_name_is_never_looked_up() -> None:
    lookup = StaticLookup(["8.8.8.8"])
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(lookup).resolve("Metadata.Google.Internal.", 80)
    assert lookup.calls == 0


@pytest.mark.parametrize("host", ["169.254.169.254", "[fe80::1]", "fe80::1", "::ffff:169.254.169.254"])
async def test_forbidden_literal_is_refused_without_lookup(host: str) -> None:
    lookup = StaticLookup(["8.8.8.8"])
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(lookup).resolve(host, 80)
    assert lookup.calls == 0


async def test_allowed_literal_is_used_as_is() -> None:
    lookup = StaticLookup([])
    resolver = SafeResolver(lookup)
    # Loopback literals: as an operator-listed target may use them (tenants' are refused).
    assert await resolver.resolve("127.0.0.1", 80, private_ok=True) == [(socket.AF_INET, "127.0.0.1")]
    assert await resolver.resolve("[::1]", 80, private_ok=True) == [(socket.AF_INET6, "::1")]
    assert lookup.calls == 0


async def test_lookups_are_cached_but_refusals_are_not() -> None:
    lookup = StaticLookup(["127.0.0.1"])
    resolver = SafeResolver(lookup, ttl=60)
    assert await resolver.resolve("localhost", 11434, private_ok=True) == [(socket.AF_INET, "127.0.0.1")]
    assert await resolver.resolve("LOCALHOST.", 11434, private_ok=True) == [(socket.AF_INET, "127.0.0.1")]
    assert lookup.calls == 1
    lookup.addresses = ["169.254.169.254"]
    expired = SafeResolver(lookup, ttl=0)
    for _ in range(2):
        with pytest.raises(ForbiddenAddressError):
            await expired.resolve("rebind.example", 80)
    assert lookup.calls == 3


async def test_system_lookup_resolves_localhost() -> None:
    addresses = await SafeResolver().resolve("localhost", 80, private_ok=True)
    assert {address for _family, address in addresses} & {"127.0.0.1", "::1"}
