"""A name that resolves to a metadata address at connect time is refused, not retried."""

from __future__ import annotations

import socket

import pytest

from server.auth.resolver import Address, SafeResolver
from server.config import RetrySettings
from server.core.retry import Deadline
from server.errors import EndpointNotAllowed, GatewayError
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient
from server.providers.openai_compat import CallOptions, post_json


class RebindingLookup:
    """Answers every name with the cloud metadata address, as a rebinding DNS server would."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls += 1
        return [(socket.AF_INET, "169.254.169.254")]


URL = "http://looks-fine.test/v1/chat/completions"


def call_options() -> CallOptions:
    return CallOptions(
        deadline=Deadline.after(5),
        retry=RetrySettings(initial_delay=0.0, max_attempts=3),
        default_timeout=5,
        scrub=lambda text: text,
    )


async def test_rebinding_name_is_endpoint_not_allowed_without_retry() -> None:
    rebinding = RebindingLookup()
    client = HttpClient(resolver=SafeResolver(rebinding))
    target = UpstreamTarget("http://looks-fine.test/v1", {}, "openai")
    try:
        with pytest.raises(EndpointNotAllowed):
            await post_json(client, target, URL, b"{}", call_options())
    finally:
        await client.close()
    assert rebinding.calls == 1  # refused once, never retried


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Authorization": "Bearer sk-canary-1234567890\r\nX-Injected: 1"}, "UPSTREAM_AUTH_FAILED"),
        ({"X-Title": "agents\nX-Injected: 1"}, "FAILED_PRECONDITION"),
    ],
)
async def test_a_header_with_a_line_break_is_refused_before_any_connection(
    headers: dict[str, str], reason: str
) -> None:
    lookup = RebindingLookup()  # any lookup at all would mean a connection attempt
    client = HttpClient(resolver=SafeResolver(lookup))
    target = UpstreamTarget("http://looks-fine.test/v1", headers, "openai")
    try:
        with pytest.raises(GatewayError) as raised:
            await post_json(client, target, URL, b"{}", call_options())
    finally:
        await client.close()
    assert raised.value.reason == reason
    assert "canary" not in raised.value.message and "Injected" not in raised.value.message
    assert lookup.calls == 0
