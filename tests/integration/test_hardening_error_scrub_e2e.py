"""Issue 12 item 1: an internal service's error body passed on by the gateway is bounded and
scrubbed, also where a key straddles the cut (the real gateway, a real loopback upstream)."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import providers_pb2

import server.auth.resolver as resolver_module
from tests.fake_upstream import FakeUpstream, Reply
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_hardening_ssrf_e2e import byok_config, loopback_lookup
from tests.integration.test_security_e2e import bearer, error_texts, expect_error, make_key


async def test_an_upstream_error_body_is_bounded_and_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "system_lookup", loopback_lookup)
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    upstream = FakeUpstream()
    await upstream.start()
    try:
        url = f"http://listed.test:{upstream.port}/v1"
        settings = make_settings(
            tmp_path, auth="required", encryption_key="pass-0123456789", allowed_endpoints=(url,)
        )
        byok_key = "byok-" + secrets.token_hex(24)
        async with running_gateway(settings) as gw:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="echo", model_endpoint_type="openai", base_url=url, api_key=byok_key
                ),
                metadata=bearer(admin),
                timeout=10,
            )
            # An internal service's error page: huge, with the key everywhere, also straddling
            # every cut a bounded message could make.
            for offset in range(0, 1100, 7):
                body = ("x" * offset + byok_key + " ") * 2000
                upstream.script(Reply(status=400, raw=body.encode(), content_type="text/plain"))
                error = await expect_error(
                    gw.chat.Create(chat_request("", llm_config=byok_config("echo")), metadata=bearer(admin))
                )
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                texts = error_texts(error)
                assert len(str(error.details())) < 2000
                for text in texts:
                    assert byok_key[:12] not in text, (offset, text[:300])
    finally:
        await upstream.stop()
