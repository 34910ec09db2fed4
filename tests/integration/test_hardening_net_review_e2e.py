"""Review of h/net (issue 12 items 1 and 13), end to end: the real gateway, real loopback servers.

Host names resolve to 127.0.0.1 through the resolver's lookup (patched: no /etc/hosts edits, no
DNS traffic). Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, providers_pb2

import server.auth.resolver as resolver_module
from server.auth.resolver import Address
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_hardening_http_head_e2e import endless_header
from tests.integration.test_security_e2e import (
    ByteSink,
    bearer,
    error_info,
    expect_error,
    expect_stream_error,
    make_key,
)
from tests.unit.test_http_client import Peer, raw_server

_real_lookup = resolver_module.system_lookup


async def loopback_lookup(host: str, port: int) -> list[Address]:
    """The operator's internal name (a Kubernetes service, say) resolves to loopback here."""
    if host.lower().rstrip(".") == "ollama.test":
        return [(socket.AF_INET, "127.0.0.1")]
    return await _real_lookup(host, port)


async def test_a_tenant_cannot_reach_the_unlisted_local_base_url_through_a_byok_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMGW_LOCAL_BASE_URL only says where the local key goes; it lists nothing. Reaching it
    needs LLMGW_ALLOWED_ENDPOINTS. A tenant that registers a BYOK provider on the same (private)
    name must not be granted the operator's private-address rule for it."""
    monkeypatch.setattr(resolver_module, "system_lookup", loopback_lookup)
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    _, user = await make_key(db, "org-a")
    sink = ByteSink()
    await sink.start()
    try:
        local = f"http://ollama.test:{sink.port}"
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="pass-" + secrets.token_hex(8),
            local_base_url=local,
            local_auth_type="bearer_token",
            local_api_key="local-" + secrets.token_hex(16),
        )
        async with running_gateway(settings) as gw:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="mine",
                    model_endpoint_type="openai",
                    base_url=local,
                    api_key="byok-" + secrets.token_hex(16),
                ),
                metadata=bearer(admin),
                timeout=10,
            )
            for endpoint_type in ("openai", "ollama"):
                config = chat_pb2.LLMConfig(
                    model="m", model_endpoint_type=endpoint_type, model_endpoint=local, context_window=128000
                )
                request = chat_request("", llm_config=config)
                for error in (
                    await expect_error(gw.chat.Create(request, metadata=bearer(user), timeout=10)),
                    await expect_stream_error(
                        gw.chat.StreamCreate(request, metadata=bearer(user), timeout=10)
                    ),
                ):
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (endpoint_type, error.details())
                    assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"
        await asyncio.sleep(0)
        assert (sink.connections, sink.received) == (0, 0)
    finally:
        await sink.stop()


async def _garbage_head(peer: Peer) -> None:
    await peer.read_request()
    try:
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX: a\x00b\r\n\r\n{}")
        await asyncio.sleep(30)
    except (ConnectionError, OSError):
        pass


async def _many_informational(peer: Peer) -> None:
    await peer.read_request()
    try:
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n" * 50)
        await asyncio.sleep(30)
    except (ConnectionError, OSError):
        pass


@pytest.mark.parametrize("handler", [endless_header, _garbage_head, _many_informational])
async def test_an_unreadable_head_is_upstream_bad_response_and_not_retried(
    tmp_path: Path, handler: Callable[[Peer], Awaitable[None]]
) -> None:
    """An upstream whose head is over the limits or not HTTP answers the same again: retrying it
    (up to LLMGW_RETRY_MAX_ATTEMPTS, each reading up to 64 KiB) only multiplies the cost. The
    README's table: "upstream answered something unreadable" is UNAVAILABLE UPSTREAM_BAD_RESPONSE."""
    async with raw_server(handler) as server:
        base = server.url(path="/v1")
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(base,))) as gw:
            async with asyncio.timeout(60):  # a bound against hanging, not a measurement
                for error in (
                    await expect_error(gw.chat.Create(chat_request(base), timeout=30)),
                    await expect_stream_error(gw.chat.StreamCreate(chat_request(base), timeout=30)),
                ):
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                    info = error_info(error)
                    assert info.reason == "UPSTREAM_BAD_RESPONSE", error.details()
                    assert info.metadata["provider"] == "openai"
        assert len(server.requests) == 2  # one per call: never retried
