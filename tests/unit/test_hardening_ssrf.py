"""Issue 12 item 1: a target the operator did not list never reaches a non-public address.

The rule is enforced on the addresses actually connected to (SafeResolver, per call), also when
they come from the resolver's cache or from a kept-alive connection; link-local and metadata
addresses stay refused for everyone.
"""

from __future__ import annotations

import socket

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.auth.endpoints import EndpointPolicy, is_public_address, normalize_url
from server.auth.resolver import Address, ForbiddenAddressError, SafeResolver
from server.config import Settings
from server.core.keys import ByokProvider, private_ok, resolve_target
from server.errors import EndpointNotAllowed
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient, Timeout
from tests.unit.test_http_client import Peer, http_answer, raw_server

BOUNDED = Timeout(total=5.0, idle=3.0)

NON_PUBLIC = (
    "127.0.0.1",
    "127.1.2.3",
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::",
    "::1",
    "fc00::1",  # ULA
    "fd12:3456::1",
    "fec0::1",  # site-local (deprecated)
    "ff02::1",  # multicast
    "ff05::2",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:192.168.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::10.0.0.1",
    "::ffff:0:127.0.0.1",  # IPv4-translated (SIIT)
    "64:ff9b::127.0.0.1",  # NAT64 embedding loopback
    "64:ff9b::10.0.0.1",
    "64:ff9b:1::a00:1",  # local-use NAT64 prefix
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:0a00:0001::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1",  # documentation
    "100::1",  # discard-only
)
PUBLIC = ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:5db8:d822::1")


def lookup_of(addresses: list[str]) -> StaticLookup:
    return StaticLookup(addresses)


class StaticLookup:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls += 1
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in self.addresses]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize("address", NON_PUBLIC)
async def test_a_name_resolving_to_a_non_public_address_is_refused_for_an_unlisted_target(
    address: str,
) -> None:
    resolver = SafeResolver(lookup_of([address]))
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve("internal.test", 80)
    # ... and as a literal host, too.
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve(address, 80)


async def test_an_operator_listed_target_may_reach_loopback_and_private_but_never_link_local() -> None:
    resolver = SafeResolver(lookup_of(["127.0.0.1", "10.0.0.5", "169.254.169.254", "fe80::1"]))
    addresses = await resolver.resolve("internal.test", 80, private_ok=True)
    assert addresses == [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "10.0.0.5")]
    with pytest.raises(ForbiddenAddressError):
        await SafeResolver(lookup_of(["169.254.169.254"])).resolve("x.test", 80, private_ok=True)


async def test_only_the_public_addresses_of_a_mixed_answer_are_used() -> None:
    resolver = SafeResolver(lookup_of(["10.0.0.1", "93.184.216.34", "::1"]))
    assert await resolver.resolve("mixed.test", 443) == [(socket.AF_INET, "93.184.216.34")]


async def test_the_cache_does_not_carry_an_operator_call_answer_to_a_tenant_call() -> None:
    lookup = lookup_of(["127.0.0.1"])
    resolver = SafeResolver(lookup, ttl=60)
    assert await resolver.resolve("shared.test", 80, private_ok=True) == [(socket.AF_INET, "127.0.0.1")]
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve("shared.test", 80)
    assert lookup.calls == 1  # the cached answer was checked again under the second call's rule


async def test_a_kept_alive_connection_to_a_private_address_is_not_reused_by_a_tenant_call() -> None:
    async def handler(peer: Peer) -> None:
        while True:
            await peer.read_request()
            await peer.send(http_answer(b"{}"))

    async with raw_server(handler) as server:
        lookup = lookup_of(["127.0.0.1"])
        client = HttpClient(resolver=SafeResolver(lookup))
        url = server.url(host="shared.test")
        try:
            response = await client.post(url, b"{}", {}, BOUNDED, private_ok=True)
            assert await response.read(1024) == b"{}"
            assert client.connections_idle == 1
            with pytest.raises(ForbiddenAddressError):
                await client.post(url, b"{}", {}, BOUNDED)
        finally:
            await client.close()
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:10.0.0.1]/v1",
        "http://[::ffff:127.0.0.1]/v1",
        "http://[64:ff9b::a00:1]/v1",
        "http://[2002:a00:1::1]/v1",
        "http://[fd00::1]/v1",
        "http://224.0.0.1/v1",
        "http://100.64.0.1/v1",
        "http://0.0.0.0/v1",
        "http://[::]/v1",
    ],
)
def test_byok_base_url_on_a_literal_non_public_address_is_refused(url: str) -> None:
    assert normalize_url(url).is_local_or_private
    with pytest.raises(EndpointNotAllowed):
        EndpointPolicy().validate_byok_base_url(url)


def test_operator_listed_is_decided_by_the_operator_lists_only() -> None:
    policy = EndpointPolicy(
        provider_base_urls=("https://api.openai.com/v1",),
        allowed_endpoints=("http://vllm.internal:8000/v1",),
    )
    assert policy.operator_listed("https://api.openai.com/v1")
    assert policy.operator_listed("http://vllm.internal:8000/v1/chat")
    assert not policy.operator_listed("http://vllm.internal:8000/v2")
    assert not policy.operator_listed("https://tenant.example/v1")
    assert EndpointPolicy(allow_private_byok=True).operator_listed("https://tenant.example/v1")


async def _resolve(
    config: chat_pb2.LLMConfig, settings: Settings, byok: ByokProvider | None
) -> UpstreamTarget:
    policy = EndpointPolicy.from_settings(settings)

    async def byok_provider(organization_id: str, name: str) -> ByokProvider | None:
        return byok

    async def byok_urls(organization_id: str) -> list[str]:
        return [byok.base_url] if byok is not None else []

    return await resolve_target(
        config,
        settings=settings,
        actor=Actor(organization_id="org-a"),
        policy=policy,
        byok_provider=byok_provider,
        byok_urls=byok_urls,
    )


async def test_targets_carry_whether_the_operator_listed_them() -> None:
    settings = Settings(
        allowed_endpoints=("http://vllm.internal:8000/v1",), openai_api_key="sk-test-0123456789"
    )
    byok = chat_pb2.LLMConfig(
        model="m", provider_name="mine", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK
    )
    tenant = ByokProvider("mine", "http://tenant.internal:8000/v1", "byok-key-0123456789")
    assert not (await _resolve(byok, settings, tenant)).private_ok
    # The same URL as a plain model_endpoint (allowed as one of the organization's BYOK URLs).
    plain = chat_pb2.LLMConfig(model="m", model_endpoint="http://tenant.internal:8000/v1")
    assert not (await _resolve(plain, settings, tenant)).private_ok
    # A BYOK provider at an operator-listed URL, the OpenAI base URL, and the local base URL.
    listed = ByokProvider("mine", "http://vllm.internal:8000/v1", "byok-key-0123456789")
    assert (await _resolve(byok, settings, listed)).private_ok
    assert (await _resolve(chat_pb2.LLMConfig(model="gpt-4o"), settings, None)).private_ok
    # LLMGW_LOCAL_BASE_URL lists nothing (rev-net): only LLMGW_ALLOWED_ENDPOINTS does.
    local = Settings(
        local_base_url="http://tenant.internal:8000", local_auth_type="bearer_token", local_api_key="k" * 12
    )
    assert not private_ok(
        "http://tenant.internal:8000/v1", policy=EndpointPolicy.from_settings(local), settings=local
    )
    listed_local = Settings(
        local_base_url="http://tenant.internal:8000",
        local_auth_type="bearer_token",
        local_api_key="k" * 12,
        allowed_endpoints=("http://tenant.internal:8000",),
    )
    assert private_ok(
        "http://tenant.internal:8000/v1",
        policy=EndpointPolicy.from_settings(listed_local),
        settings=listed_local,
    )
