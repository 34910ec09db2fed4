"""The trace's cached copy of an LLMConfig against the redactor learning a secret later.

The copy is scrubbed once and kept (server.core.config_cache); a BYOK key is registered with the
redactor only when its provider's key is first decrypted. A config that carried that key before
(an agent's stop list, a schema description) was kept unscrubbed of it and written into every
later trace of that config, while every other trace field was scrubbed of it.
"""

from __future__ import annotations

import secrets

import pytest

from server.auth.redact import REDACTED
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_config_key import _queued


async def test_a_secret_learned_after_the_config_was_cached_is_scrubbed_from_its_trace_copy(
    gateway: RunningGateway, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _queued(monkeypatch)
    secret = "byok" + secrets.token_hex(16)  # no pattern matches it: only the redactor knows it
    request = chat_request(upstream.base_url)
    request.llm_config.stop.append(secret)
    await gateway.chat.Create(request, timeout=20)
    assert secret in records[-1].llm_config_json  # not a secret yet: traced as sent

    assert gateway.server.gateway is not None
    redactor = gateway.server.gateway.deps.redactor
    assert redactor is not None
    redactor.add_owned("org-a/provider", secret)  # as decrypting a BYOK provider's key does
    await gateway.chat.Create(request, timeout=20)
    record = records[-1]
    assert secret not in record.llm_config_json and REDACTED in record.llm_config_json
    assert secret not in record.request_json

    redactor.discard_owner("org-a/provider")  # forgotten again: traced as sent, as before caching
    await gateway.chat.Create(request, timeout=20)
    assert secret in records[-1].llm_config_json


async def test_an_unchanged_redactor_keeps_the_cached_copy(
    gateway: RunningGateway, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _queued(monkeypatch)
    request = chat_request(upstream.base_url, llm_config=None)
    request.llm_config.stop.append("END")
    for _ in range(3):
        await gateway.chat.Create(request, timeout=20)
    assert records[0].llm_config_json is records[1].llm_config_json is records[2].llm_config_json
