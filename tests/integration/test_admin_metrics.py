"""The admin listener's /metrics: exact counts of what the gateway did, parsed by prometheus_client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from llmgateway.v1 import chat_pb2
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import chat_request, make_settings, running_gateway

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, **headers: str) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_count_creates_failures_and_streams_exactly(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0")
    async with running_gateway(settings) as gw:
        admin = gw.server.admin
        assert admin is not None
        before = await scrape(admin.port)
        model = "metrics-model-a"
        creates, failures, streams, retried = 5, 3, 2, 1
        for _ in range(creates):
            await gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=10)
        # 400: UPSTREAM_REJECTED, not retried; 3 of them.
        upstream.script(
            *(Reply(status=400, json_body={"error": {"message": "bad"}}) for _ in range(failures))
        )
        for _ in range(failures):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # One 503 then success: one retry, one more OK create.
        upstream.script(Reply(status=503, json_body={"error": {"message": "busy"}}))
        await gw.chat.Create(chat_request(upstream.base_url, model=model), timeout=10)
        for _ in range(streams):
            upstream.script(Reply(sse=text_stream(["Hel", "lo"])))
            events = [
                e
                async for e in gw.chat.StreamCreate(chat_request(upstream.base_url, model=model), timeout=10)
            ]
            assert events[-1].HasField("completion")
        await asyncio.sleep(1.2)  # the sampler copies the trace lanes' counters once a second
        after = await scrape(admin.port)

    labels = {"provider": "openai", "model": model}
    assert (
        delta(before, after, "llmgw_requests_total", rpc="Create", code="OK", **labels) == creates + retried
    )
    assert (
        delta(before, after, "llmgw_requests_total", rpc="Create", code="INVALID_ARGUMENT", **labels)
        == failures
    )
    assert delta(before, after, "llmgw_requests_total", rpc="StreamCreate", code="OK", **labels) == streams
    assert (
        delta(before, after, "llmgw_upstream_errors_total", provider="openai", reason="UPSTREAM_REJECTED")
        == failures
    )
    assert delta(before, after, "llmgw_retries_total", reason="UPSTREAM_UNAVAILABLE") == retried
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": model}
    ok_calls = creates + retried + streams
    assert (
        delta(before, after, "gen_ai_client_operation_duration_seconds_count", error_type="", **genai)
        == ok_calls
    )
    assert (
        delta(
            before,
            after,
            "gen_ai_client_operation_duration_seconds_count",
            error_type="UPSTREAM_REJECTED",
            **genai,
        )
        == failures
    )
    # Every OK call: 12 prompt and 3 completion tokens (unary), 20 and 7 (the streams' usage chunk).
    assert (
        delta(before, after, "gen_ai_client_token_usage_count", gen_ai_token_type="input", **genai)
        == ok_calls
    )
    assert delta(before, after, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **genai) == (
        (creates + retried) * 12 + streams * 20
    )
    assert delta(before, after, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **genai) == (
        (creates + retried) * 3 + streams * 7
    )
    assert (
        delta(before, after, "gen_ai_client_operation_time_to_first_chunk_seconds_count", **genai) == streams
    )
    assert delta(before, after, "llmgw_traces_written_total", backend="sqlite") == ok_calls + failures
    assert value(after, "llmgw_in_flight", kind="unary") == 0
    assert value(after, "llmgw_trace_queue_depth", backend="sqlite") == 0


async def test_unknown_models_fold_into_other_past_the_budget(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A client sending a new model name per call cannot blow up the label set."""
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0", metrics_max_models=3
    )
    async with running_gateway(settings) as gw:
        assert gw.server.admin is not None
        before = await scrape(gw.server.admin.port)
        names = [f"fold-model-{i}" for i in range(10)]
        for name in names:
            await gw.chat.Create(chat_request(upstream.base_url, model=name), timeout=10)
        after = await scrape(gw.server.admin.port)
    labelled = {
        dict(labels)["model"]
        for (name, labels) in after
        if name == "llmgw_requests_total" and "model" in dict(labels)
    }
    admitted = [n for n in names if n in labelled]
    assert admitted == names[:3]  # the budget: the first three, in order of arrival
    labels = {"rpc": "Create", "provider": "openai", "code": "OK"}
    assert delta(before, after, "llmgw_requests_total", model="other", **labels) == len(names) - 3
    metrics.models.reset(metrics.DEFAULT_MAX_MODELS)


async def test_made_up_model_names_that_fail_do_not_use_up_the_budget(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A tenant sending model names no upstream serves (every call MODEL_NOT_FOUND) must not fold
    the next real model, of anyone, into `other`: failing models take at most half the budget."""
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0", metrics_max_models=3
    )
    not_found = {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}
    try:
        async with running_gateway(settings) as gw:
            assert gw.server.admin is not None
            before = await scrape(gw.server.admin.port)
            for i in range(6):
                upstream.script(Reply(status=404, json_body=not_found))
                with pytest.raises(grpc.aio.AioRpcError):
                    await gw.chat.Create(chat_request(upstream.base_url, model=f"made-up-{i}"), timeout=10)
            await gw.chat.Create(chat_request(upstream.base_url, model="real-model"), timeout=10)
            upstream.script(Reply(status=400, json_body={"error": {"message": "bad"}}))
            with pytest.raises(grpc.aio.AioRpcError):  # admitted now: its failures keep its name
                await gw.chat.Create(chat_request(upstream.base_url, model="real-model"), timeout=10)
            after = await scrape(gw.server.admin.port)
    finally:
        metrics.models.reset(metrics.DEFAULT_MAX_MODELS)
    models = {dict(labels).get("model") for (name, labels) in after if name == "llmgw_requests_total"}
    # Half the budget of 3 (one place) for models that never answered: the first made-up name.
    assert sorted(m for m in models if m and m.startswith("made-up-")) == ["made-up-0"]
    base = {"rpc": "Create", "provider": "openai"}
    assert delta(before, after, "llmgw_requests_total", model="real-model", code="OK", **base) == 1
    assert (
        delta(before, after, "llmgw_requests_total", model="real-model", code="INVALID_ARGUMENT", **base) == 1
    )
    assert delta(before, after, "llmgw_requests_total", model="other", code="NOT_FOUND", **base) == 5


async def test_made_up_model_names_counted_by_count_tokens_do_not_use_up_the_budget(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """CountTokens answers OK for any model name without calling an upstream: that is no proof the
    model exists, so a tenant counting tokens for made-up names must not take the budget's places."""
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0", metrics_max_models=3
    )
    try:
        async with running_gateway(settings) as gw:
            assert gw.server.admin is not None
            before = await scrape(gw.server.admin.port)
            for i in range(6):
                await gw.chat.CountTokens(chat_request(upstream.base_url, model=f"counted-{i}"), timeout=10)
            await gw.chat.Create(chat_request(upstream.base_url, model="real-model"), timeout=10)
            after = await scrape(gw.server.admin.port)
    finally:
        metrics.models.reset(metrics.DEFAULT_MAX_MODELS)
    models = {dict(labels).get("model") for (name, labels) in after if name == "llmgw_requests_total"}
    assert sorted(m for m in models if m and m.startswith("counted-")) == ["counted-0"]
    base = {"provider": "openai", "code": "OK"}
    assert delta(before, after, "llmgw_requests_total", rpc="Create", model="real-model", **base) == 1
    assert delta(before, after, "llmgw_requests_total", rpc="CountTokens", model="other", **base) == 5


async def test_made_up_model_names_of_a_routed_call_that_a_fallback_answers_do_not_use_up_the_budget(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A routed call answered OK by a fallback proves the fallback's model, not llm_config's (never
    sent when its endpoint is not allowed; only generation parameters with a route)."""
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0", metrics_max_models=3
    )
    fallback = chat_pb2.LLMConfig(
        model="real-model", model_endpoint_type="openai", model_endpoint=upstream.base_url
    )
    try:
        async with running_gateway(settings) as gw:
            assert gw.server.admin is not None
            before = await scrape(gw.server.admin.port)
            for i in range(6):
                request = chat_request("http://127.0.0.1:9/v1", model=f"routed-{i}", fallbacks=[fallback])
                await gw.chat.Create(request, timeout=10)
            await gw.chat.Create(chat_request(upstream.base_url, model="second-real-model"), timeout=10)
            after = await scrape(gw.server.admin.port)
    finally:
        metrics.models.reset(metrics.DEFAULT_MAX_MODELS)
    models = {dict(labels).get("model") for (name, labels) in after if name == "llmgw_requests_total"}
    assert sorted(m for m in models if m and m.startswith("routed-")) == ["routed-0"]
    base = {"rpc": "Create", "provider": "openai", "code": "OK"}
    assert delta(before, after, "llmgw_requests_total", model="second-real-model", **base) == 1
    assert delta(before, after, "llmgw_requests_total", model="other", **base) == 5


async def test_unknown_endpoint_type_is_other(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0")
    async with running_gateway(settings) as gw:
        assert gw.server.admin is not None
        before = await scrape(gw.server.admin.port)
        config = chat_pb2.LLMConfig(
            model="m", model_endpoint_type="<script>x", model_endpoint=upstream.base_url
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(chat_request(upstream.base_url, llm_config=config), timeout=10)
        after = await scrape(gw.server.admin.port)
    assert (
        delta(
            before,
            after,
            "llmgw_requests_total",
            rpc="Create",
            provider="other",
            model="m",
            code="INVALID_ARGUMENT",
        )
        == 1
    )


async def test_a_stream_cancelled_by_its_client_counts_once_as_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The caller goes away after the first delta: one CANCELLED call, in flight back to 0, and
    no upstream error (the upstream did nothing wrong)."""
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), admin_listen="127.0.0.1:0")
    async with running_gateway(settings) as gw:
        assert gw.server.admin is not None
        port = gw.server.admin.port
        before = await scrape(port)
        upstream.script(Reply(sse=text_stream(["a"] + ["b"] * 50), hang_after=2))
        call = gw.chat.StreamCreate(chat_request(upstream.base_url, model="cancel-model"), timeout=30)
        async for _ in call:
            break
        during = await scrape(port)
        call.cancel()
        deadline = asyncio.get_running_loop().time() + 10
        after = await scrape(port)
        labels = {"rpc": "StreamCreate", "provider": "openai", "model": "cancel-model", "code": "CANCELLED"}
        while delta(before, after, "llmgw_requests_total", **labels) < 1:
            assert asyncio.get_running_loop().time() < deadline, "the cancelled stream was never counted"
            await asyncio.sleep(0.05)
            after = await scrape(port)
    assert value(during, "llmgw_in_flight", kind="stream") == 1
    assert delta(before, after, "llmgw_requests_total", **labels) == 1
    assert delta(before, after, "llmgw_requests_total", **{**labels, "code": "OK"}) == 0
    assert value(after, "llmgw_in_flight", kind="stream") == 0
    assert not any(
        name == "llmgw_upstream_errors_total" and delta(before, after, name, **dict(lbl))
        for (name, lbl) in after
    )
