"""Issue 12 item 1 end to end: a BYOK host name that resolves to loopback reaches nothing.

The real gateway, real loopback servers; the host names resolve to 127.0.0.1 through the
resolver's lookup (patched here: no /etc/hosts edits, no DNS traffic), or through names this
machine's /etc/hosts already maps to loopback. Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, providers_pb2

import server.auth.resolver as resolver_module
from server.auth.resolver import Address
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_security_e2e import (
    ByteSink,
    bearer,
    error_info,
    expect_error,
    expect_stream_error,
    make_key,
)

LOOPBACK_NAMES = ("internal.test", "evil.nip.io", "localtest.me", "svc.cluster.local")
_real_lookup = resolver_module.system_lookup


async def loopback_lookup(host: str, port: int) -> list[Address]:
    """What a DNS server (or /etc/hosts, or cluster DNS) would answer for the test's names."""
    if host.lower().rstrip(".") in LOOPBACK_NAMES + ("listed.test",):
        return [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")]
    return await _real_lookup(host, port)


def etc_hosts_loopback_names() -> list[str]:
    """Names other than localhost this machine's resolver maps to loopback (e.g. its hostname)."""
    found = []
    for name in {socket.gethostname(), "vm", "runsc", "ip6-localhost"}:
        if name.lower().startswith("localhost"):
            continue
        try:
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if infos and all(str(info[4][0]).startswith("127.") or info[4][0] == "::1" for info in infos):
            found.append(name)
    return sorted(found)


async def register(gw: RunningGateway, admin: str, name: str, base_url: str) -> None:
    await gw.providers.CreateProvider(
        providers_pb2.CreateProviderRequest(
            name=name,
            model_endpoint_type="openai",
            base_url=base_url,
            api_key="byok-" + secrets.token_hex(16),
        ),
        metadata=bearer(admin),
        timeout=10,
    )


def byok_config(name: str) -> chat_pb2.LLMConfig:
    return chat_pb2.LLMConfig(
        model="gpt-4o-mini",
        model_endpoint_type="openai",
        provider_name=name,
        provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
        context_window=128000,
    )


async def assert_refused(gw: RunningGateway, key: str, request: chat_pb2.CreateRequest) -> None:
    for error in (
        await expect_error(gw.chat.Create(request, metadata=bearer(key), timeout=10)),
        await expect_stream_error(gw.chat.StreamCreate(request, metadata=bearer(key), timeout=10)),
    ):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        info = error_info(error)
        assert info.reason == "ENDPOINT_NOT_ALLOWED" and info.domain == "llmgateway"


async def test_byok_names_resolving_to_loopback_reach_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "system_lookup", loopback_lookup)
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    _, user = await make_key(db, "org-a")
    sink = ByteSink()
    await sink.start()
    listed = FakeUpstream()
    await listed.start()
    try:
        listed_url = f"http://listed.test:{listed.port}/v1"
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="pass-" + secrets.token_hex(8),
            allowed_endpoints=(listed_url,),  # the operator's own internal server: allowed
        )
        names = [*LOOPBACK_NAMES, *etc_hosts_loopback_names()]
        async with running_gateway(settings) as gw:
            await register(gw, admin, "listed", listed_url)
            for index, name in enumerate(names):
                url = f"http://{name}:{sink.port}/v1"
                await register(gw, admin, f"p{index}", url)
                await assert_refused(gw, user, chat_request("", llm_config=byok_config(f"p{index}")))
                # The same URL as a plain model_endpoint (allowed as the organization's BYOK URL).
                await assert_refused(gw, user, chat_request(url))
            # The control: an operator-listed name resolving to loopback works as before.
            response = await gw.chat.Create(
                chat_request("", llm_config=byok_config("listed")), metadata=bearer(user), timeout=10
            )
            assert response.completion.choices[0].message.content == "Hello!"
        assert len(listed.requests) == 1
        assert (sink.connections, sink.received) == (0, 0)
    finally:
        await sink.stop()
        await listed.stop()
