"""OpenTelemetry: off unless the standard OTEL_* variables ask for an exporter.

When on, the gRPC server is instrumented with opentelemetry-instrumentation-grpc and every
upstream call is a child span carrying the GenAI semantic attributes (see `server.gateway`).
When off, no tracer exists and the hot path pays nothing for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llmgateway.telemetry")


def exporter_requested(environ: Mapping[str, str] | None = None) -> str | None:
    """The exporter the environment asks for ("otlp", "console"), or None."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter != "none":
        return exporter.split(",")[0].strip()
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


@dataclass(frozen=True, slots=True)
class Tracing:
    """What the server needs of OpenTelemetry when it is on."""

    tracer: Any
    interceptor: Any
    provider: Any  # shut down on stop, so the last spans are exported

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup_tracing(
    environ: Mapping[str, str] | None = None, *, exporter_override: Any = None
) -> Tracing | None:
    """Install a tracer provider; returns the tracer and server interceptor, or None when off.

    `exporter_override` (a SpanExporter) turns tracing on with that exporter, for tests.
    """
    exporter_name = "override" if exporter_override is not None else exporter_requested(environ)
    if exporter_name is None:
        return None
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

    exporter: SpanExporter
    if exporter_override is not None:
        exporter = exporter_override
        processor: Any = SimpleSpanProcessor(exporter)
    elif exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
        processor = SimpleSpanProcessor(exporter)
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
        processor = BatchSpanProcessor(exporter)
    else:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console); tracing stays off", exporter_name
        )
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llm-gateway")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    if exporter_override is None:
        trace.set_tracer_provider(provider)  # global, for any library that traces too
    log.info("OpenTelemetry tracing on, exporter %s", exporter_name)
    return Tracing(
        provider.get_tracer("llmgateway"), aio_server_interceptor(tracer_provider=provider), provider
    )
