"""The gateway's cache of resolved server-key targets (server.core.keys.TargetCache).

A cached target must never be one another caller could not have: a URL allowed only as an
organization's BYOK base URL is resolved per caller every time, and a refusal is not cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.auth.endpoints import EndpointPolicy
from server.config import Settings
from server.core.keys import ByokProvider, TargetCache, resolve_target
from server.errors import EndpointNotAllowed
from server.providers.base import UpstreamTarget

SETTINGS = Settings(allowed_endpoints=("http://vllm.internal:8000/v1",), openai_api_key="sk-test-0123456789")
TENANT_URL = "https://tenant.example/v1"


async def _resolve(config: chat_pb2.LLMConfig, organization: str, cache: TargetCache) -> UpstreamTarget:
    async def byok_provider(organization_id: str, name: str) -> ByokProvider | None:
        return None

    async def byok_urls(organization_id: str) -> Sequence[str]:
        return [TENANT_URL] if organization_id == "org-a" else []

    return await resolve_target(
        config,
        settings=SETTINGS,
        actor=Actor(organization_id=organization),
        policy=POLICY,
        byok_provider=byok_provider,
        byok_urls=byok_urls,
        cache=cache,
    )


POLICY = EndpointPolicy.from_settings(SETTINGS)


async def test_a_listed_endpoint_resolves_once_to_the_same_target() -> None:
    cache = TargetCache()
    config = chat_pb2.LLMConfig(
        model="m", model_endpoint_type="openai", model_endpoint="http://vllm.internal:8000/v1/"
    )
    first = await _resolve(config, "org-a", cache)
    again = await _resolve(config, "org-b", cache)
    assert again is first
    assert first == await _resolve(config, "org-b", TargetCache())  # what it resolves to uncached
    assert first.base_url == "http://vllm.internal:8000/v1" and first.private_ok


async def test_an_endpoint_allowed_as_one_organizations_byok_url_is_not_cached_for_others() -> None:
    cache = TargetCache()
    config = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", model_endpoint=TENANT_URL)
    target = await _resolve(config, "org-a", cache)
    assert target.base_url == TENANT_URL and not target.private_ok
    with pytest.raises(EndpointNotAllowed):
        await _resolve(config, "org-b", cache)
    assert (await _resolve(config, "org-a", cache)) == target


async def test_the_key_is_the_endpoint_type_and_provider_name_too() -> None:
    cache = TargetCache()
    configs = [
        chat_pb2.LLMConfig(
            model="m", model_endpoint_type="openai", model_endpoint="http://vllm.internal:8000/v1"
        ),
        chat_pb2.LLMConfig(
            model="m",
            model_endpoint_type="openai",
            provider_name="mine",
            model_endpoint="http://vllm.internal:8000/v1",
        ),
        chat_pb2.LLMConfig(
            model="m", model_endpoint_type="openai", model_endpoint="https://api.openai.com/v1"
        ),
    ]
    for _ in range(2):
        for config in configs:
            assert await _resolve(config, "org-a", cache) == await _resolve(config, "org-a", TargetCache())
    named = await _resolve(configs[1], "org-a", cache)
    assert named.provider == "mine" and named.secrets == ()  # never the server's key off its base URL
    official = await _resolve(configs[2], "org-a", cache)
    assert official.secrets == ("sk-test-0123456789",)


async def test_a_long_endpoint_or_provider_name_is_resolved_but_not_kept() -> None:
    """Validation bounds neither field (the gRPC limit is 64 MiB): the cache must not keep them."""
    cache = TargetCache()
    long_name = chat_pb2.LLMConfig(
        model="m",
        model_endpoint_type="openai",
        provider_name="p" * 100_000,
        model_endpoint="http://vllm.internal:8000/v1",
    )
    long_url = chat_pb2.LLMConfig(
        model="m", model_endpoint_type="openai", model_endpoint="http://vllm.internal:8000/v1/" + "a" * 5_000
    )
    for config in (long_name, long_url):
        assert await _resolve(config, "org-a", cache) == await _resolve(config, "org-a", TargetCache())
    assert len(cache) == 0
    short = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", provider_name="p" * 256)
    await _resolve(short, "org-a", cache)
    assert len(cache) == 1
