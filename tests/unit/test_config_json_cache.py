"""The trace's scrubbed copy of an LLMConfig is cached per config, but never a huge one: a
caller could otherwise pin 1,024 configs of tens of megabytes each (provider_name has no length
limit below grpc's message size)."""

from __future__ import annotations

from typing import Any, cast

from llmgateway.v1 import chat_pb2

from server.config import Settings
from server.core.config_cache import MAX_CACHED_CONFIG_BYTES
from server.gateway import Dependencies, Gateway


def _gateway() -> Gateway:
    unused = cast(Any, None)  # _config_json uses only settings and scrub
    deps = Dependencies(
        settings=Settings(),
        http=unused,
        traces=unused,
        policy=unused,
        byok_provider=unused,
        byok_urls=unused,
        scrub=lambda text: text.replace("sk-secret", "[REDACTED]"),
    )
    return Gateway(deps)


def test_small_configs_are_cached_scrubbed() -> None:
    gateway = _gateway()
    config = chat_pb2.LLMConfig(model="gpt-4o-mini", provider_name="sk-secret", context_window=128000)
    first = gateway._config_json(config)
    assert "[REDACTED]" in first and "sk-secret" not in first
    assert gateway._config_json(config) is first  # the cached string
    assert len(gateway._config_json_cache) == 1


def test_a_huge_config_is_not_kept() -> None:
    gateway = _gateway()
    config = chat_pb2.LLMConfig(model="m", provider_name="p" * (MAX_CACHED_CONFIG_BYTES + 1))
    text = gateway._config_json(config)
    assert '"providerName"' in text or '"provider_name"' in text
    assert len(gateway._config_json_cache) == 0
