"""Review of the over-the-minute-limit mapping (commit 0752cb2): the same error arriving as a
stream's first `error` event, and the upstream's `code` in the metadata."""

from __future__ import annotations

from pathlib import Path

import grpc
import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.providers import errors
from tests.fake_upstream import FakeUpstream, Reply
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_over_minute_limit import OPENAI_429_TOO_LARGE


def _stream_request(base_url: str) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest(
        llm_config=chat_pb2.LLMConfig(model="gpt-4o", model_endpoint_type="openai", model_endpoint=base_url),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )


QUOTA = {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": 429}


@pytest.mark.parametrize("kind", ["too_large", "quota"])
async def test_a_first_stream_event_no_wait_clears_is_not_retried(tmp_path: Path, kind: str) -> None:
    # OpenRouter and proxies send an upstream's 429 as the stream's first event (HTTP 200): the
    # same request is as much too large there (and a used-up quota as used up); it must not be
    # retried to the end of the budget, as the same error with HTTP 429 is not.
    event = (
        {"error": {**OPENAI_429_TOO_LARGE["error"], "code": 429}} if kind == "too_large" else {"error": QUOTA}
    )
    upstream = FakeUpstream()
    await upstream.start()
    try:
        upstream.script(*[Reply(sse=[event])] * 6)
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in gw.chat.StreamCreate(_stream_request(upstream.base_url), timeout=20):
                    pass
        sent = len(upstream.requests)
    finally:
        await upstream.stop()
    d = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert sent == 1
    assert d.retry_delay is None
    assert d.metadata["http_status"] == "200"
    if kind == "too_large":
        assert d.metadata["requested_tokens"] == "342389"


def test_the_upstream_code_in_the_metadata_is_scrubbed() -> None:
    secret = "sk-proj-SECRETSECRETSECRET"
    body = {"error": {**OPENAI_429_TOO_LARGE["error"], "code": f"rate_limit_exceeded {secret}"}}
    error = errors.error_for_status(
        429, orjson.dumps(body), {}, provider="openai", scrub=lambda s: s.replace(secret, "[redacted]")
    )
    assert secret not in str(error.metadata)
