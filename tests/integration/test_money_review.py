"""Review of issue 17 (money and limits) against routing (issue 16), metrics (issue 18) and a
hostile caller: a routed call is admitted once and settled with the answering attempt's usage;
QUOTA_EXCEEDED on a routed call neither falls back nor cools a deployment; the cost counter of
/metrics is the exact sum of the answers' Usage.cost_usd; a stream the client abandons after the
upstream answered still counts against the limits."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from server import metrics
from server.limits.model import nano_dollars
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_admin_metrics import scrape, value
from tests.integration.test_errors_support import expect
from tests.integration.test_money_gateway import NOON, bearer, keys_command, limiter_of, new_key, usage
from tests.integration.test_routing_e2e import (
    deployment,
    fakes,
    route_keys,
    routed,
    routes_toml,
    write_routes,
)

__all__ = ["fakes", "route_keys"]  # fixtures of the routing tests, used here

MINUTE = str(int(NOON // 60))
DAY = "2026-03-14"


def two_priced(fakes: list[FakeUpstream]) -> str:
    # A (gpt-4o) first (weight), B (gpt-4o-mini) second; both priced, so spend limits apply.
    return routes_toml(
        {
            "chat": (
                {},
                [
                    deployment("a", fakes[0].base_url, model="gpt-4o", weight=1e12),
                    deployment("b", fakes[1].base_url, model="gpt-4o-mini", weight=1e-9),
                ],
            )
        },
        cooldown_seconds=30.0,
    )


async def routed_gateway(tmp_path: Path, fakes: list[FakeUpstream], **overrides: Any) -> Any:
    settings = make_settings(
        tmp_path,
        auth="required",
        routes_file=write_routes(tmp_path, two_priced(fakes)),
        allowed_endpoints=tuple(f.base_url for f in fakes),
        **overrides,
    )
    await new_key(settings, "bootstrap")
    return settings


def counter(gw: RunningGateway, name: str) -> int:
    return limiter_of(gw).counters.value(name)  # type: ignore[attr-defined, no-any-return]


async def test_routed_call_admitted_once_and_settled_with_the_answering_attempt(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    settings = await routed_gateway(tmp_path, fakes)
    async with running_gateway(settings) as gw:
        limiter_of(gw).clock = lambda: NOON
        key_id, token = await new_key(settings, "acme")
        await keys_command(settings, "limits", "--key", key_id, "--rpm", "10", "--tpm", "100000",
                           "--spend-day", "5")  # fmt: skip
        fakes[0].script(Reply(status=500, json_body={"error": {"message": "boom"}}))
        # gpt-4o-mini: 1000 x $0.15 + 200 x $0.60 per million = 0.00015 + 0.00012 = $0.00027.
        fakes[1].script(Reply(json_body=completion(usage=usage(1000, 200))))
        response = await gw.chat.Create(routed(), metadata=bearer(token), timeout=10)
        assert response.deployment.name == "b" and response.completion.usage.cost_usd == "0.00027"
        assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
        assert counter(gw, f"key:{key_id}:requests_per_minute:{MINUTE}") == 1  # one call, two attempts
        assert counter(gw, f"key:{key_id}:tokens_per_minute:{MINUTE}") == 1200  # B's usage, once
        assert counter(gw, f"key:{key_id}:spend_per_day:{DAY}") == 270_000  # nano-dollars

        # The same through a stream: A refuses, B streams; settled with B's streamed usage.
        fakes[0].script(Reply(status=503, raw=b"down"))
        fakes[1].script(Reply(sse=text_stream(["Hel", "lo"])))  # usage 20 + 7
        stream_request = chat_pb2.StreamCreateRequest.FromString(routed().SerializeToString())
        events = [e async for e in gw.chat.StreamCreate(stream_request, metadata=bearer(token), timeout=10)]
        last = events[-1].completion.usage
        assert events[-1].deployment.name == "b" and (last.total_tokens, last.cost_usd) == (27, "0.0000072")
        assert counter(gw, f"key:{key_id}:requests_per_minute:{MINUTE}") == 2
        assert counter(gw, f"key:{key_id}:tokens_per_minute:{MINUTE}") == 1227
        assert counter(gw, f"key:{key_id}:spend_per_day:{DAY}") == 270_000 + nano_dollars(7_200_000)


async def test_quota_exceeded_on_a_routed_call_neither_falls_back_nor_cools(
    tmp_path: Path, fakes: list[FakeUpstream]
) -> None:
    settings = await routed_gateway(tmp_path, fakes)
    async with running_gateway(settings) as gw:
        limiter_of(gw).clock = lambda: NOON
        key_id, token = await new_key(settings, "acme")
        await keys_command(settings, "limits", "--key", key_id, "--rpm", "1")
        await gw.chat.Create(routed(), metadata=bearer(token), timeout=10)
        for stream in (False, True):
            if stream:
                call: Any = gw.chat.StreamCreate(
                    chat_pb2.StreamCreateRequest.FromString(routed().SerializeToString()),
                    metadata=bearer(token),
                    timeout=10,
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await gw.chat.Create(routed(), metadata=bearer(token), timeout=10)
            d = expect(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
            assert d.error_infos[0].metadata["attempts"] == "1"  # no second deployment tried
        assert len(fakes[0].requests) == 1 and fakes[1].requests == []
        running = gw.server._running  # noqa: SLF001 - the router's health
        assert running is not None
        health = running.router.health
        assert all(health.cooling_until(unit) == 0.0 for unit in ("chat/a", "chat/b"))
        # Another key is not affected: A is healthy and answers.
        _, other = await new_key(settings, "acme")
        response = await gw.chat.Create(routed(), metadata=bearer(other), timeout=10)
        assert response.deployment.name == "a"


async def test_cost_counter_is_the_exact_sum_of_the_answers_cost(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # A model of its own (gpt-4o's prices): metrics are per process, other tests price gpt-4o.
    prices = tmp_path / "prices.json"
    prices.write_text(
        '{"models": [{"provider": "openai", "model": "review-exact", "input": "2.50", "output": "10.00",'
        ' "source": "test", "date": "2026-03-14"}]}'
    )
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0", prices_file=str(prices)
    )
    # review-exact: $0.01 (2000 in, 500 out) and $0.00012 (20 in, 7 out), four times each: $0.04048.
    # Added as floats they make 0.040479999999999995 (a counter that drifts); exact, 0.04048.
    usages = [usage(2000, 500), usage(20, 7)]
    drift = 0.0
    for _ in range(4):
        drift += 0.01
        drift += 0.00012
    assert drift != 0.04048  # the test can tell an exact sum from a float one
    metrics.models.reset(metrics.DEFAULT_MAX_MODELS)  # a fresh label budget: the model keeps its name
    async with running_gateway(settings) as gw:
        admin = gw.server.admin
        assert admin is not None
        before = await scrape(admin.port)
        costs: list[str] = []
        for _ in range(4):
            for u in usages:
                upstream.script(Reply(json_body=completion(usage=u)))
                r = await gw.chat.Create(chat_request(upstream.base_url, model="review-exact"), timeout=10)
                costs.append(r.completion.usage.cost_usd)
        upstream.script(Reply(json_body=completion(usage=usage(5, 5))))
        await gw.chat.Create(chat_request(upstream.base_url, model="review-unpriced"), timeout=10)
        after = await scrape(admin.port)
    exact = sum((Decimal(c) for c in costs), Decimal(0))
    labels = {"provider": "openai", "model": "review-exact"}
    assert value(before, "llmgw_cost_usd_total", **labels) == 0.0
    got = value(after, "llmgw_cost_usd_total", **labels)
    assert exact == Decimal("0.04048")
    assert got == float(exact), (got, exact)  # the float nearest the exact sum, no drift
    unpriced = {"provider": "openai", "model": "review-unpriced"}
    assert (
        value(after, "llmgw_unpriced_calls_total", **unpriced)
        - value(before, "llmgw_unpriced_calls_total", **unpriced)
        == 1
    )
    assert value(after, "llmgw_cost_usd_total", **unpriced) == 0.0


async def test_a_stream_abandoned_after_the_upstream_answered_still_counts(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    await new_key(settings, "bootstrap")
    async with running_gateway(settings) as gw:
        limiter_of(gw).clock = lambda: NOON
        key_id, token = await new_key(settings, "acme")
        await keys_command(settings, "limits", "--key", key_id, "--tpm", "100000", "--spend-day", "5")
        words = ["word"] * 200
        upstream.script(Reply(sse=text_stream(words), chunk_delay=0.01))
        request = chat_pb2.StreamCreateRequest.FromString(
            chat_request(upstream.base_url, model="gpt-4o").SerializeToString()
        )
        call = gw.chat.StreamCreate(request, metadata=bearer(token), timeout=10)
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 20:
                break
        call.cancel()
        await asyncio.sleep(0.5)
        tokens_used = counter(gw, f"key:{key_id}:tokens_per_minute:{MINUTE}")
        spend = counter(gw, f"key:{key_id}:spend_per_day:{DAY}")
    # The prompt went upstream and at least 20 chunks came back: billed, so counted.
    assert tokens_used >= 20, tokens_used
    assert spend > 0, spend


async def test_a_unary_call_cancelled_while_upstream_works_keeps_its_reservation(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    await new_key(settings, "bootstrap")
    async with running_gateway(settings) as gw:
        limiter_of(gw).clock = lambda: NOON
        key_id, token = await new_key(settings, "acme")
        await keys_command(settings, "limits", "--key", key_id, "--tpm", "100000")
        upstream.script(Reply(json_body=completion(usage=usage(10, 500)), delay=3.0))
        request = chat_request(upstream.base_url, model="gpt-4o")
        request.llm_config.max_tokens = 500
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(request, metadata=bearer(token), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.5)
        assert len(upstream.requests) == 1  # it went upstream, which bills it
        # The reservation stays: the prompt's tokens and max_tokens (nothing came back).
        assert counter(gw, f"key:{key_id}:tokens_per_minute:{MINUTE}") >= 500
