"""A name that resolves to a metadata address at connect time is refused, not retried."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from server.config import RetrySettings
from server.core.retry import Deadline
from server.errors import EndpointNotAllowed
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient
from server.providers.openai_compat import CallOptions, post_json


class RebindingResolver(AbstractResolver):
    """Answers every name with the cloud metadata address, as a rebinding DNS server would."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        self.calls += 1
        return [
            ResolveResult(
                hostname=host, host="169.254.169.254", port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


async def test_rebinding_name_is_endpoint_not_allowed_without_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    rebinding = RebindingResolver()
    monkeypatch.setattr("server.auth.resolver.DefaultResolver", lambda: rebinding)
    client = HttpClient()
    options = CallOptions(
        deadline=Deadline.after(5),
        retry=RetrySettings(initial_delay=0.0, max_attempts=3),
        default_timeout=5,
        scrub=lambda text: text,
    )
    target = UpstreamTarget("http://looks-fine.test/v1", {}, "openai")
    try:
        with pytest.raises(EndpointNotAllowed):
            await post_json(client, target, "http://looks-fine.test/v1/chat/completions", b"{}", options)
    finally:
        await client.close()
    assert rebinding.calls == 1  # refused once, never retried
