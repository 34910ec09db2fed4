"""`Gateway.new_trace` puts each value of the call in its own field (it builds the record with
positional arguments, in TraceRecord's field order), scrubbed, and the owner from the key only."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.config import Settings
from server.gateway import Dependencies, Gateway
from server.providers.base import UpstreamTarget
from server.traces.base import TraceRecord


def _gateway() -> Gateway:
    unused = cast(Any, None)  # new_trace uses only settings and scrub
    deps = Dependencies(
        settings=Settings(),
        http=unused,
        traces=unused,
        policy=unused,
        byok_provider=unused,
        byok_urls=unused,
        scrub=lambda text: text.replace("sk-secret", "[REDACTED]"),
    )
    return Gateway(deps)


def _request(**changes: Any) -> chat_pb2.CreateRequest:
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model="model-m", model_endpoint_type="type-t", handle="sk-secret"),
        trace=chat_pb2.TraceContext(
            step_id="step-s", agent_id="agent-a", run_id="run-r", call_type="call-c", tags=["t1", "t2"]
        ),
        user_id="request-user",
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def test_new_trace_fills_every_field() -> None:
    actor = Actor(organization_id="org-o", user_id="key-user", key_id="key-k")
    target = UpstreamTarget(base_url="http://x", headers={}, provider="provider-p", is_byok=True)
    before = datetime.now(UTC)
    record = _gateway().new_trace(_request(), actor, target, b'{"messages":"my sk-secret"}')
    assert before <= record.created_at <= datetime.now(UTC)
    assert record.id.startswith("provider_trace-")
    config = json.loads(record.llm_config_json)
    assert config["model"] == "model-m" and config["handle"] == "[REDACTED]"
    expected = TraceRecord(
        id=record.id,
        created_at=record.created_at,
        organization_id="org-o",
        user_id="request-user",
        step_id="step-s",
        agent_id="agent-a",
        agent_tags=["t1", "t2"],
        run_id="run-r",
        call_type="call-c",
        provider="provider-p",
        model="model-m",
        model_endpoint_type="type-t",
        is_byok=True,
        request_json='{"messages":"my [REDACTED]"}',
        llm_config_json=record.llm_config_json,
        owner="user:key-user",
        key_id="key-k",
    )
    for field in fields(TraceRecord):  # one by one, so a failure names the field
        assert getattr(record, field.name) == getattr(expected, field.name), field.name


def test_new_trace_defaults_without_a_target_a_user_or_a_call_type() -> None:
    actor = Actor(organization_id="org-o", key_id="key-k")
    request = _request(user_id="")
    request.trace.call_type = ""
    record = _gateway().new_trace(request, actor, None, b"{}")
    assert (record.user_id, record.call_type, record.provider) == ("", "agent_step", "type-t")
    assert (record.is_byok, record.owner, record.request_json) == (False, "key:key-k", "{}")
    assert (record.response_json, record.notes, record.cost_usd) == ("", [], None)


def test_new_trace_tags_are_a_list_of_their_own() -> None:
    """With tags and without (the usual case): a plain list, never the request's field."""
    actor = Actor(organization_id="org-o")
    request = _request()
    record = _gateway().new_trace(request, actor, None, b"{}")
    assert type(record.agent_tags) is list and record.agent_tags == ["t1", "t2"]
    record.agent_tags.append("t3")
    assert list(request.trace.tags) == ["t1", "t2"]
    del request.trace.tags[:]
    empty = _gateway().new_trace(request, actor, None, b"{}")
    assert type(empty.agent_tags) is list and empty.agent_tags == []
    assert empty.agent_tags is not _gateway().new_trace(request, actor, None, b"{}").agent_tags


class _Sink:
    def __init__(self) -> None:
        self.records: list[TraceRecord] = []

    def enqueue(self, record: TraceRecord) -> None:
        self.records.append(record)

    def enqueue_after(self, record: TraceRecord, ready: Any) -> None:
        raise AssertionError("small traces are queued at once")


def test_finish_trace_records_each_kind_of_ending() -> None:
    """No error (tested first), a GatewayError, a cancellation, GeneratorExit and any other
    exception: each sets the error fields it always did, scrubbed, and queues the trace."""
    import asyncio

    from server.errors import UpstreamUnavailable
    from server.inflight import CANCELLED_BY_CALLER

    sink = _Sink()
    gateway = _gateway()
    gateway.deps.traces = sink
    actor = Actor(organization_id="org-o")
    endings: list[tuple[BaseException | None, tuple[str, str]]] = [
        (None, ("", "")),
        (UpstreamUnavailable("down: sk-secret"), ("UPSTREAM_UNAVAILABLE", "down: [REDACTED]")),
        (asyncio.CancelledError(), CANCELLED_BY_CALLER),
        (GeneratorExit(), CANCELLED_BY_CALLER),
        (ValueError("bad sk-secret"), ("ValueError", "bad [REDACTED]")),
    ]
    for error, (error_type, error_message) in endings:
        record = gateway.new_trace(_request(), actor, None, b"{}")
        gateway.finish_trace(record, 0.0, error)
        assert sink.records[-1] is record
        assert (record.error_type, record.error_message) == (error_type, error_message), error
        assert record.latency_ms > 0


def test_traced_call_with_and_without_a_tracer() -> None:
    """_TraceScope makes a span only when a tracer is configured: without one the call has no
    span (and the trace is queued all the same); with one, the span is entered for the call,
    ended with it, carries the usage of a success, and records a failure only once the error
    was scrubbed."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode, get_current_span

    from server.auth.redact import Redactor
    from server.errors import UpstreamUnavailable

    secret = "sk-" + "s3cr3t" * 5
    redactor = Redactor()
    sink = _Sink()
    gateway = _gateway()
    gateway.deps.traces, gateway.deps.redactor, gateway.deps.scrub = sink, redactor, redactor.redact
    actor = Actor(organization_id="org-o")
    target = UpstreamTarget(base_url="http://x", headers={}, provider="provider-p")
    completion = chat_pb2.ChatCompletion(
        id="c-1", model="model-m", usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=4)
    )

    with gateway.traced_call(_request(), actor, target, b"{}", "unary") as call:
        assert call.span is None
        call.completion = completion
    assert sink.records[-1].prompt_tokens == 3 and sink.records[-1].error_type == ""

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway.deps.tracer = provider.get_tracer("test")
    with gateway.traced_call(_request(), actor, target, b"{}", "unary") as call:
        assert call.span is not None and get_current_span() is call.span
        call.completion = completion
    assert not get_current_span().get_span_context().is_valid  # left: no span current after it
    (span,) = exporter.get_finished_spans()
    assert span.name == "chat model-m" and span.attributes is not None
    usage = (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"])
    assert usage == (3, 4)
    assert sink.records[-1].prompt_tokens == 3

    exporter.clear()
    with pytest.raises(UpstreamUnavailable):
        with gateway.traced_call(_request(), actor, target, b"{}", "unary"):
            raise UpstreamUnavailable(f"down: {secret}")
    (failed,) = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert secret not in repr([(e.name, dict(e.attributes or {})) for e in failed.events])
    assert secret not in (failed.status.description or "")
    assert sink.records[-1].error_type == "UPSTREAM_UNAVAILABLE"
    assert secret not in sink.records[-1].error_message
