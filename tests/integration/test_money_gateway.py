"""Cost and limits end to end: the real gateway in-process in front of real loopback upstreams.

What the client got (Usage.cost_usd, QUOTA_EXCEEDED with QuotaFailure and RetryInfo), what the
trace says (cost_usd exact, or empty when unpriced), what the upstream saw (nothing when a limit
refused). Limits are set as an operator does, with `llm-gateway keys limits`, or with the admin
RPC. The limiter's clock is moved to a known instant so windows never roll by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from llmgateway.v1 import chat_pb2, usage_pb2, usage_pb2_grpc

from server.auth.cli import add_keys_subparser, run_keys_command_async
from server.auth.store_sqlite import SqliteAuthStore
from server.config import Settings
from server.limits.limiter import Limiter
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.fakes import anthropic_fake, gemini_fake
from tests.fakes.anthropic_fake import AnthropicFake
from tests.fakes.gemini_fake import GeminiFake
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

USER = chat_pb2.ROLE_USER
# 2026-03-14 12:00:30 UTC: mid-minute, so a per-minute window has 30 s left.
NOON = datetime(2026, 3, 14, 12, 0, 30, tzinfo=UTC).timestamp()


def usage(prompt: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def keys_command(settings: Settings, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    add_keys_subparser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    code = await run_keys_command_async(parser.parse_args(["keys", *argv]), settings, out=out, err=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


async def new_key(settings: Settings, org: str, *, admin: bool = False, user: str = "") -> tuple[str, str]:
    async with SqliteAuthStore(path=settings.sqlite_path) as store:
        return await store.create_key(organization_id=org, is_admin=admin, user_id=user)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def limiter_of(gw: RunningGateway) -> Limiter:
    assert gw.server.gateway is not None and gw.server.gateway.deps.limiter is not None
    return gw.server.gateway.deps.limiter


def quota_failure(err: grpc.aio.AioRpcError) -> error_details_pb2.QuotaFailure:
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            found = error_details_pb2.QuotaFailure()
            detail.Unpack(found)
            return found
    raise AssertionError("no QuotaFailure in the status")


async def refused(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def authed(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    await new_key(settings, "bootstrap")  # the store exists before the server starts
    async with running_gateway(settings) as gw:
        limiter_of(gw).clock = lambda: NOON
        yield gw


def gpt4o(upstream: FakeUpstream, **fields: Any) -> chat_pb2.CreateRequest:
    return chat_request(upstream.base_url, model="gpt-4o", **fields)


# -- cost --------------------------------------------------------------------------------------


async def test_openai_cost_in_usage_and_trace(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    # gpt-4o: 800 uncached x $2.50 + 1200 cached x $1.25 + 500 output x $10 per million = $0.0085.
    upstream.script(
        Reply(json_body=completion(model="gpt-4o-2024-08-06", usage=usage(2000, 500, cached=1200)))
    )
    request = gpt4o(upstream, trace=chat_pb2.TraceContext(step_id="step-cost"))
    response = await gateway.chat.Create(request, timeout=10)
    assert response.completion.usage.cost_usd == "0.0085"
    trace = await wait_for_trace(gateway.traces, "step-cost")
    assert trace.usage.cost_usd == "0.0085"


async def test_streamed_openai_cost(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    from tests.fake_upstream import chunk, usage_chunk

    # gpt-4o: 20 x $2.50 + 7 x $10 per million = 0.00005 + 0.00007 = $0.00012.
    upstream.script(Reply(sse=[chunk({"role": "assistant", "content": "Hi"}), chunk({}, finish_reason="stop"),
                               usage_chunk(20, 7), "[DONE]"]))  # fmt: skip
    stream_request = chat_pb2.StreamCreateRequest.FromString(gpt4o(upstream).SerializeToString())
    events = [e async for e in gateway.chat.StreamCreate(stream_request, timeout=10)]
    assert events[-1].completion.usage.cost_usd == "0.00012"


async def test_unpriced_model_is_recorded_unpriced(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion(usage=usage(100, 10))))
    request = chat_request(
        upstream.base_url, model="gpt-99-preview", trace=chat_pb2.TraceContext(step_id="s-unpriced")
    )
    response = await gateway.chat.Create(request, timeout=10)
    assert response.completion.usage.cost_usd == ""  # unknown, never "0"
    assert response.completion.usage.prompt_tokens == 100
    trace = await wait_for_trace(gateway.traces, "s-unpriced")
    assert trace.usage.cost_usd == ""
    meter = gateway.server.gateway.deps.meter  # type: ignore[union-attr]
    assert meter is not None and meter.unpriced == 1


@pytest.fixture
async def anthropic() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def anthropic_cache_usage() -> dict[str, Any]:
    split = {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 3000}
    return {
        **anthropic_fake.usage(100, 400, cache_read=20000, cache_write=5000),
        "cache_creation": split,
    }


async def test_anthropic_cache_writes_priced_by_duration_unary_and_stream(
    tmp_path: Path, anthropic: AnthropicFake
) -> None:
    # claude-sonnet-4-5: 100 x $3 + 20000 reads x $0.30 + 2000 5m writes x $3.75
    # + 3000 1h writes x $6 + 400 output x $15, per million = $0.0378 (test_billing has the sum).
    settings = make_settings(
        tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key="sk-ant-" + "k" * 40
    )
    async with running_gateway(settings) as gw:
        config = chat_pb2.LLMConfig(model="claude-sonnet-4-5-20250929", model_endpoint_type="anthropic")
        req = chat_pb2.CreateRequest(llm_config=config, messages=[chat_pb2.Message(role=USER, content="hi")])
        body = anthropic_fake.message([anthropic_fake.text_block("Hello!")], usage_=anthropic_cache_usage())
        anthropic.script(anthropic_fake.Reply(json_body=body))
        response = await gw.chat.Create(req, timeout=10)
        assert response.completion.usage.cache_write_1h_tokens == 3000
        assert response.completion.usage.cost_usd == "0.0378"

        start = anthropic_fake.message_start(100, cache_read=20000, cache_write=5000)
        start[1]["message"]["usage"]["cache_creation"] = anthropic_cache_usage()["cache_creation"]
        # message_delta repeats the cumulative counts: counted once, not twice.
        events = [
            start,
            *anthropic_fake.text_events(0, ["Hel", "lo"]),
            anthropic_fake.message_delta(
                "end_turn",
                400,
                input_tokens=100,
                cache_read_input_tokens=20000,
                cache_creation_input_tokens=5000,
            ),
            anthropic_fake.MESSAGE_STOP,
        ]
        anthropic.script(anthropic_fake.Reply(sse=events))
        stream_req = chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())
        streamed = [e async for e in gw.chat.StreamCreate(stream_req, timeout=10)]
        assert streamed[-1].completion.usage.cost_usd == "0.0378"


async def test_gemini_cached_and_thinking_cost(tmp_path: Path) -> None:
    fake = GeminiFake()
    await fake.start()
    try:
        settings = make_settings(tmp_path, google_ai_base_url=fake.base_url, gemini_api_key="AIza" + "k" * 35)
        async with running_gateway(settings) as gw:
            # gemini-2.5-flash: 2000 x $0.30 + 8000 cached x $0.03 + (200 + 1000 thinking) x $2.50
            # per million = 0.0006 + 0.00024 + 0.003 = $0.00384.
            meta = gemini_fake.usage_metadata(10000, 200, thoughts=1000, cached=8000)
            fake.push(gemini_fake.Reply(body=gemini_fake.response(usage=meta)))
            config = chat_pb2.LLMConfig(model="gemini-2.5-flash", model_endpoint_type="google_ai")
            req = chat_pb2.CreateRequest(
                llm_config=config, messages=[chat_pb2.Message(role=USER, content="hi")]
            )
            response = await gw.chat.Create(req, timeout=10)
            assert response.completion.usage.cost_usd == "0.00384"
    finally:
        await fake.stop()


# -- limits, one server ------------------------------------------------------------------------


async def test_requests_per_minute_per_key(authed: RunningGateway, upstream: FakeUpstream) -> None:
    key_id, token = await new_key(authed.settings, "acme")
    out = await keys_command(authed.settings, "limits", "--key", key_id, "--rpm", "3")
    assert "requests_per_minute=3" in out
    for _ in range(3):
        await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    err = await refused(authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert d.retry_infos[0].retry_delay.seconds == 30  # 12:00:30 -> the minute ends at 12:01:00
    assert quota_failure(err).violations[0].subject == f"key:{key_id}:requests_per_minute"
    assert len(upstream.requests) == 3  # the refused call sent nothing
    # Another key of the organization has its own window.
    _, other = await new_key(authed.settings, "acme")
    await authed.chat.Create(gpt4o(upstream), metadata=bearer(other), timeout=10)
    # The next minute frees it.
    limiter_of(authed).clock = lambda: NOON + 30
    await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    assert len(upstream.requests) == 5


async def test_concurrent_calls_never_pass_the_limit(authed: RunningGateway, upstream: FakeUpstream) -> None:
    key_id, token = await new_key(authed.settings, "acme")
    await keys_command(authed.settings, "limits", "--key", key_id, "--rpm", "5")
    upstream.script(*(Reply(json_body=completion(), delay=0.2) for _ in range(20)))
    calls = [authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=20) for _ in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    passed = [r for r in results if not isinstance(r, BaseException)]
    assert len(passed) == 5
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results if r not in passed)
    assert len(upstream.requests) == 5


async def test_tokens_per_minute_per_organization(authed: RunningGateway, upstream: FakeUpstream) -> None:
    _, token = await new_key(authed.settings, "tpm-org")
    await keys_command(authed.settings, "limits", "--org", "tpm-org", "--tpm", "40")
    # Each call reports 20 tokens: after two the organization's minute holds 40, its limit.
    upstream.script(*(Reply(json_body=completion(usage=usage(15, 5))) for _ in range(2)))
    for _ in range(2):
        await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    err = await refused(authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10))
    expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert quota_failure(err).violations[0].subject == "org:tpm-org:tokens_per_minute"
    assert len(upstream.requests) == 2
    # A call whose own reservation (prompt + max_tokens) is over the limit never passes.
    limiter_of(authed).clock = lambda: NOON + 60
    big = gpt4o(upstream)
    big.llm_config.max_tokens = 1000
    err = await refused(authed.chat.Create(big, metadata=bearer(token), timeout=10))
    assert "alone" in expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED").message
    assert len(upstream.requests) == 2


async def test_spend_per_day_crosses_midnight_utc(authed: RunningGateway, upstream: FakeUpstream) -> None:
    key_id, token = await new_key(authed.settings, "acme")
    await keys_command(authed.settings, "limits", "--key", key_id, "--spend-day", "0.01")
    limiter = limiter_of(authed)
    before_midnight = datetime(2026, 3, 14, 23, 59, 0, tzinfo=UTC).timestamp()
    limiter.clock = lambda: before_midnight
    # Each call costs $0.0085 (as above): the first leaves $0.0015 of the day, whose reservation
    # (the prompt's few tokens at $2.50 per million) still fits; after the second the day is over.
    upstream.script(*(Reply(json_body=completion(usage=usage(2000, 500, cached=1200))) for _ in range(3)))
    for _ in range(2):
        await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    err = await refused(authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert d.retry_infos[0].retry_delay.seconds == 60  # until 00:00:00 UTC
    assert d.error_infos[0].metadata["limit"] == "spend_per_day"
    assert len(upstream.requests) == 2
    limiter.clock = lambda: before_midnight + 61  # 00:00:01 the next day
    response = await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    assert response.completion.usage.cost_usd == "0.0085"
    assert len(upstream.requests) == 3


async def test_unpriced_model_under_a_spend_limit_is_refused(
    authed: RunningGateway, upstream: FakeUpstream
) -> None:
    key_id, token = await new_key(authed.settings, "acme")
    await keys_command(authed.settings, "limits", "--key", key_id, "--spend-month", "100")
    request = chat_request(upstream.base_url, model="gpt-99-preview")
    err = await refused(authed.chat.Create(request, metadata=bearer(token), timeout=10))
    expect(err, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert upstream.requests == []


async def test_stream_is_limited_and_settled(authed: RunningGateway, upstream: FakeUpstream) -> None:
    from tests.fake_upstream import text_stream

    key_id, token = await new_key(authed.settings, "acme")
    await keys_command(authed.settings, "limits", "--key", key_id, "--rpm", "1", "--tpm", "1000")
    upstream.script(Reply(sse=text_stream(["Hel", "lo"])))
    stream_request = chat_pb2.StreamCreateRequest.FromString(gpt4o(upstream).SerializeToString())
    events = [e async for e in authed.chat.StreamCreate(stream_request, metadata=bearer(token), timeout=10)]
    total = events[-1].completion.usage.total_tokens
    counters = limiter_of(authed).counters
    minute = str(int(NOON // 60))
    assert counters.value(f"key:{key_id}:tokens_per_minute:{minute}") == total  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in authed.chat.StreamCreate(stream_request, metadata=bearer(token), timeout=10):
            pass
    expect(info.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert len(upstream.requests) == 1


async def test_failed_call_releases_its_reservation(authed: RunningGateway, upstream: FakeUpstream) -> None:
    key_id, token = await new_key(authed.settings, "acme")
    await keys_command(authed.settings, "limits", "--key", key_id, "--tpm", "1000")
    upstream.script(
        Reply(status=400, json_body={"error": {"message": "bad", "type": "invalid_request_error"}})
    )
    await refused(authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10))
    counters = limiter_of(authed).counters
    assert counters.value(f"key:{key_id}:tokens_per_minute:{int(NOON // 60)}") == 0  # type: ignore[attr-defined]


# -- the admin RPC ------------------------------------------------------------------------------


async def test_limits_rpc_is_admin_only_and_stays_in_the_organization(
    authed: RunningGateway, upstream: FakeUpstream
) -> None:
    stub = usage_pb2_grpc.LimitsServiceStub(authed.channel)
    _, admin = await new_key(authed.settings, "acme", admin=True)
    key_id, token = await new_key(authed.settings, "acme")
    other_key, _ = await new_key(authed.settings, "globex")
    limits = usage_pb2.Limits(requests_per_minute=1, spend_per_day_usd="2.50")
    answer = await stub.SetKeyLimits(
        usage_pb2.SetKeyLimitsRequest(key_id=key_id, limits=limits), metadata=bearer(admin), timeout=10
    )
    assert answer.limits.spend_per_day_usd == "2.5"
    read = await stub.GetLimits(usage_pb2.GetLimitsRequest(key_id=key_id), metadata=bearer(admin), timeout=10)
    assert read.limits.requests_per_minute == 1
    # Applies at once on this server.
    await authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10)
    err = await refused(authed.chat.Create(gpt4o(upstream), metadata=bearer(token), timeout=10))
    expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    # Another organization's key: NOT_FOUND, as a key that does not exist.
    err = await refused(
        stub.SetKeyLimits(
            usage_pb2.SetKeyLimitsRequest(key_id=other_key, limits=limits), metadata=bearer(admin)
        )
    )
    expect(err, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    err = await refused(stub.GetLimits(usage_pb2.GetLimitsRequest(key_id=other_key), metadata=bearer(admin)))
    expect(err, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    # A non-admin key may not set limits, not even its own.
    err = await refused(
        stub.SetKeyLimits(
            usage_pb2.SetKeyLimitsRequest(key_id=key_id, limits=usage_pb2.Limits()), metadata=bearer(token)
        )
    )
    expect(err, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    # Bad values are INVALID_ARGUMENT with a BadRequest per field.
    bad = usage_pb2.Limits(requests_per_minute=-1, spend_per_month_usd="1e9")
    err = await refused(
        stub.SetKeyLimits(usage_pb2.SetKeyLimitsRequest(key_id=key_id, limits=bad), metadata=bearer(admin))
    )
    d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    fields = {v.field for v in d.bad_requests[0].field_violations}
    assert fields == {"limits.requests_per_minute", "limits.spend_per_month_usd"}


async def test_cli_limits_show_merge_and_off(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key_id, token = await new_key(settings, "acme")
    assert "no limits" in await keys_command(settings, "limits", "--key", key_id)
    await keys_command(
        settings, "limits", "--key", token, "--rpm", "10", "--spend-month", "99.99"
    )  # a pasted key
    out = await keys_command(settings, "limits", "--key", key_id, "--tpm", "5000", "--rpm", "off")
    assert "tokens_per_minute=5000" in out and "spend_per_month=99.99 USD" in out and "requests" not in out
    assert token not in out
    parser = argparse.ArgumentParser()
    add_keys_subparser(parser.add_subparsers(dest="command"))
    err = io.StringIO()
    args = parser.parse_args(["keys", "limits", "--org", "acme", "--spend-day", "-1"])
    assert await run_keys_command_async(args, settings, out=io.StringIO(), err=err) == 2
    assert "spend" in err.getvalue()
