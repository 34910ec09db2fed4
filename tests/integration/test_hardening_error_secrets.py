"""Issue 12, same class as item 13: a key an upstream echoes must not reach the caller through an
error (message, ErrorInfo metadata, trailers) nor an exporter through span attributes or the
exception recorded on a span.

The upstream is the real loopback echo server of `tests.echo_upstream`; the gateway is the real
server with an in-memory span exporter.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from llmgateway.v1 import chat_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.app import GatewayServer
from tests.echo_upstream import EchoUpstream
from tests.gateway_harness import chat_request, make_settings, running_gateway

SEND = chat_pb2.FunctionDefinition(name="send_message", description="Say something")
SEND.parameters.update({"type": "object", "properties": {"message": {"type": "string"}}})


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    upstream = EchoUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def error_texts(error: grpc.aio.AioRpcError) -> str:
    """Everything a caller can read from a failed call: message, trailers, decoded details."""
    texts = [str(error.details()), str(error.debug_error_string())]
    for key, value in error.trailing_metadata() or ():
        if isinstance(value, bytes):
            texts.append(value.decode("latin-1"))
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                texts.append(status.message)
                for detail in status.details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        texts.append(json_format.MessageToJson(info))
        else:
            texts.append(f"{key}: {value}")
    return "\n".join(texts)


def span_texts(spans: tuple[ReadableSpan, ...]) -> str:
    """Every attribute and event (recorded exceptions included) of the exported spans."""
    out = []
    for span in spans:
        out.append(json.dumps({k: str(v) for k, v in (span.attributes or {}).items()}))
        for event in span.events:
            out.append(event.name + json.dumps({k: str(v) for k, v in (event.attributes or {}).items()}))
    return "\n".join(out)


async def _error(call: object) -> grpc.aio.AioRpcError:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded; an error was expected")


async def test_tool_name_echoing_the_key_is_not_in_error_metadata(tmp_path: Path, echo: EchoUpstream) -> None:
    # A tool call named after the key, with arguments that are not JSON: UPSTREAM_BAD_RESPONSE
    # whose ErrorInfo names the function.
    key = "sk-" + secrets.token_urlsafe(36)
    echo.mode = "tool_name"
    exporter = InMemorySpanExporter()
    settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=echo.base_url)
    async with running_gateway(settings, server=GatewayServer(settings, span_exporter=exporter)) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint=echo.base_url,
            context_window=128000,
            put_inner_thoughts_in_kwargs=True,
        )
        error = await _error(
            gw.chat.Create(chat_request("", llm_config=config, functions=[SEND]), timeout=20)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not valid JSON" in error.details()
    assert echo.authorizations == [f"Bearer {key}"]
    assert key not in error_texts(error)
    assert key not in span_texts(exporter.get_finished_spans())


async def test_answer_fields_echoing_the_key_are_not_in_span_attributes(
    tmp_path: Path, echo: EchoUpstream
) -> None:
    # The completion's `id` and `model` go to span attributes (gen_ai.response.*).
    key = "sk-" + secrets.token_urlsafe(36)
    exporter = InMemorySpanExporter()
    settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=echo.base_url)
    async with running_gateway(settings, server=GatewayServer(settings, span_exporter=exporter)) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint=echo.base_url,
            context_window=128000,
        )
        response = await gw.chat.Create(chat_request("", llm_config=config), timeout=20)
    assert response.completion.model == "you sent Bearer [REDACTED] ok"
    spans = exporter.get_finished_spans()
    assert any("gen_ai.response.model" in (s.attributes or {}) for s in spans)
    assert key not in span_texts(spans)
