"""OpenTelemetry: off by default; when on, the gRPC call is a server span and each upstream call
a child span with the GenAI semantic attributes."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from server.app import GatewayServer
from server.telemetry import exporter_requested
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import chat_request, make_settings, running_gateway


def test_off_unless_the_environment_asks_for_an_exporter() -> None:
    assert exporter_requested({}) is None
    assert exporter_requested({"OTEL_SERVICE_NAME": "x"}) is None
    assert exporter_requested({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert exporter_requested({"OTEL_TRACES_EXPORTER": "otlp"}) == "otlp"
    assert exporter_requested({"OTEL_TRACES_EXPORTER": "console,otlp"}) == "console"
    assert exporter_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == "otlp"
    assert exporter_requested({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None


async def test_upstream_calls_are_child_spans_with_genai_attributes(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    exporter = InMemorySpanExporter()
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    upstream.script(
        Reply(status=429, json_body={"error": {"message": "slow down"}}),
        Reply(json_body=completion("hi")),
        Reply(sse=text_stream(["a", "b"])),
    )
    async with running_gateway(settings, server=GatewayServer(settings, span_exporter=exporter)) as gw:
        await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
        [e async for e in gw.chat.StreamCreate(chat_request(upstream.base_url), timeout=10)]

    spans = exporter.get_finished_spans()
    servers = {s.name: s for s in spans if s.kind == SpanKind.SERVER}
    clients = [s for s in spans if s.kind == SpanKind.CLIENT and s.name.startswith("chat ")]
    assert "/llmgateway.v1.ChatCompletionService/Create" in servers
    assert "/llmgateway.v1.ChatCompletionService/StreamCreate" in servers
    assert len(clients) == 2
    create_span, stream_span = clients
    assert create_span.parent is not None
    assert (
        create_span.parent.span_id == servers["/llmgateway.v1.ChatCompletionService/Create"].context.span_id
    )
    assert stream_span.parent is not None
    assert (
        stream_span.parent.span_id
        == servers["/llmgateway.v1.ChatCompletionService/StreamCreate"].context.span_id
    )
    attributes = dict(create_span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.system"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]  # type: ignore[arg-type]
    assert [e.name for e in create_span.events] == ["llm_retry_attempt"]  # the 429 was retried
    assert dict(stream_span.attributes or {})["gen_ai.usage.output_tokens"] == 7
