"""Bad input and the rows of the status table produced before any upstream is called."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import (
    CHAT,
    EVERY_RPC,
    assert_serving,
    call_raw,
    details,
    expect,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CHAT_RPCS = ("Create", "StreamCreate", "CountTokens")


async def call_chat(gw: RunningGateway, rpc: str, request: chat_pb2.CreateRequest) -> None:
    if rpc == "Create":
        await gw.chat.Create(request, timeout=10)
    elif rpc == "CountTokens":
        await gw.chat.CountTokens(
            chat_pb2.CountTokensRequest.FromString(request.SerializeToString()), timeout=10
        )
    else:
        stream_request = chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())
        async for _ in gw.chat.StreamCreate(stream_request, timeout=10):
            pass


async def rejected(gw: RunningGateway, rpc: str, request: chat_pb2.CreateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_chat(gw, rpc, request)
    return info.value


def _config(base_url: str, **fields: object) -> chat_pb2.LLMConfig:
    values: dict[str, object] = {
        "model": "gpt-4o-mini",
        "model_endpoint_type": "openai",
        "model_endpoint": base_url,
        "context_window": 128000,
    }
    values.update(fields)
    return chat_pb2.LLMConfig(**values)  # type: ignore[arg-type]


def _function(name: str, schema: dict[str, object]) -> chat_pb2.FunctionDefinition:
    params = struct_pb2.Struct()
    params.update(schema)
    return chat_pb2.FunctionDefinition(name=name, parameters=params)


def _cases(base_url: str) -> list[tuple[str, chat_pb2.CreateRequest, str]]:
    user = chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")
    return [
        (
            "required-not-strings",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[user],
                functions=[_function("f", {"type": "object", "properties": {}, "required": [{"a": 1}]})],
            ),
            "functions[0].parameters.required",
        ),
        (
            "nested-required-not-strings",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[user],
                functions=[_function("f", {"properties": {"x": {"type": "object", "required": [[1]]}}})],
            ),
            "functions[0].parameters.properties.x.required",
        ),
        (
            "properties-not-object",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[user],
                functions=[_function("f", {"properties": [1, 2]})],
            ),
            "functions[0].parameters.properties",
        ),
        ("no-messages", chat_pb2.CreateRequest(llm_config=_config(base_url)), "messages"),
        (
            "no-model",
            chat_pb2.CreateRequest(llm_config=_config(base_url, model=""), messages=[user]),
            "llm_config.model",
        ),
        (
            "unknown-type",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url, model_endpoint_type="skynet"), messages=[user]
            ),
            "llm_config.model_endpoint_type",
        ),
        (
            "bad-role",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url), messages=[chat_pb2.Message(role=42, content="x")]
            ),  # type: ignore[arg-type]
            "messages[0].role",
        ),
        (
            "unspecified-role",
            chat_pb2.CreateRequest(llm_config=_config(base_url), messages=[chat_pb2.Message(content="x")]),
            "messages[0].role",
        ),
        (
            "negative-window",
            chat_pb2.CreateRequest(llm_config=_config(base_url, context_window=-1), messages=[user]),
            "llm_config.context_window",
        ),
        (
            "args-not-json",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[
                    user,
                    chat_pb2.Message(
                        role=chat_pb2.ROLE_ASSISTANT,
                        tool_calls=[chat_pb2.ToolCall(id="c1", name="f", arguments="{not json")],
                    ),
                ],
            ),
            "messages[1].tool_calls[0].arguments",
        ),
        (
            "oversized",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="x" * 2_000_001)],
            ),
            "messages[0].content",
        ),
        (
            "bad-endpoint-url",
            chat_pb2.CreateRequest(llm_config=_config(base_url, model_endpoint="ftp://x"), messages=[user]),
            "llm_config.model_endpoint",
        ),
        (
            "temperature",
            chat_pb2.CreateRequest(llm_config=_config(base_url, temperature=float("nan")), messages=[user]),
            "llm_config.temperature",
        ),
        (
            "max-tokens",
            chat_pb2.CreateRequest(llm_config=_config(base_url, max_tokens=-5), messages=[user]),
            "llm_config.max_tokens",
        ),
        (
            "tool-without-id",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[user, chat_pb2.Message(role=chat_pb2.ROLE_TOOL, content="r")],
            ),
            "messages[1].tool_call_id",
        ),
        (
            "bad-function-name",
            chat_pb2.CreateRequest(
                llm_config=_config(base_url),
                messages=[user],
                functions=[chat_pb2.FunctionDefinition(name="no spaces!")],
            ),
            "functions[0].name",
        ),
    ]


@pytest.mark.parametrize("rpc", CHAT_RPCS)
async def test_validation_failures_are_invalid_argument_with_field_violations(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    for name, request, field in _cases(upstream.base_url):
        err = await rejected(gateway, rpc, request)
        d = expect(err, INVALID, "INVALID_REQUEST")
        assert field in d.violations, (name, d.violations)
        assert d.violations[field], name
        assert field in d.metadata["fields"], name
    assert not upstream.requests  # nothing invalid ever left the gateway
    await assert_serving(gateway.channel)


async def test_every_problem_is_reported_at_once(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model_endpoint_type="nope", context_window=-3),
        messages=[chat_pb2.Message(role=99)],  # type: ignore[arg-type]
    )
    d = expect(await rejected(gateway, "Create", request), INVALID, "INVALID_REQUEST")
    assert {
        "llm_config.model",
        "llm_config.model_endpoint_type",
        "llm_config.context_window",
        "messages[0].role",
    } <= set(d.violations)


async def test_thousands_of_violations_still_fit_the_trailers(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Every violation cannot be listed (the client's metadata limit is 8 KiB): the status must
    # still arrive whole, as INVALID_ARGUMENT with details, not as a transport error.
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model="m" * 100_000, model_endpoint_type="é" * 50_000),
        messages=[chat_pb2.Message(role=77, content="x") for _ in range(5000)],  # type: ignore[arg-type]
    )
    for rpc in CHAT_RPCS:
        d = expect(await rejected(gateway, rpc, request), INVALID, "INVALID_REQUEST")
        assert 1 <= len(d.violations) <= 25
        assert len(d.status.SerializeToString()) < 4096


@pytest.mark.parametrize("method", EVERY_RPC)
@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x08" + b"\xff" * 11, b"\x12\x05abc", b"\x0b\x00"],
    ids=["varint-garbage", "length-past-end", "overlong-varint", "truncated", "group"],
)
async def test_bytes_that_do_not_decode_are_invalid_argument(
    gateway: RunningGateway, method: str, data: bytes
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, method, data)
    d = expect(info.value, INVALID, "INVALID_REQUEST")
    assert "is not a valid" in d.message
    assert d.metadata["bytes"] == str(len(data))
    assert d.bad_requests
    await assert_serving(gateway.channel)


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(gateway: RunningGateway) -> None:
    # field 2 (messages), a Message whose field 2 (content) is not UTF-8
    data = b"\x12\x04\x12\x02\xc3\x28"
    for method in (CHAT + "Create", CHAT + "CountTokens", CHAT + "StreamCreate"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call_raw(gateway.channel, method, data)
        expect(info.value, INVALID, "INVALID_REQUEST")


async def test_context_window_exceeded(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    request = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, "word " * 500), context_window=50)
    for rpc in ("Create", "StreamCreate"):
        d = expect(await rejected(gateway, rpc, request), INVALID, "CONTEXT_WINDOW_EXCEEDED")
        assert "maximum context length" in d.message
        assert d.metadata["context_window"] == "50"
        assert int(d.metadata["total_tokens"]) > 50
    assert not upstream.requests


async def test_missing_api_key_for_the_official_endpoint(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, openai_base_url=upstream.base_url, openai_api_key="")
    async with running_gateway(settings) as gw:
        for rpc in ("Create", "StreamCreate"):
            d = expect(
                await rejected(gw, rpc, chat_request(upstream.base_url)),
                grpc.StatusCode.FAILED_PRECONDITION,
                "MISSING_API_KEY",
            )
            assert "openai_api_key" in d.metadata["missing_fields"]
        # An empty model_endpoint means the official endpoint too.
        request = chat_request(upstream.base_url)
        request.llm_config.model_endpoint = ""
        expect(await rejected(gw, "Create", request), grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
        assert not upstream.requests


async def test_endpoint_not_allowed(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    for url in ("http://127.0.0.1:9/v1", "http://169.254.169.254/latest", "https://evil.example.com/v1"):
        for rpc in ("Create", "StreamCreate"):
            d = expect(
                await rejected(gateway, rpc, chat_request(url)),
                grpc.StatusCode.PERMISSION_DENIED,
                "ENDPOINT_NOT_ALLOWED",
            )
            assert d.metadata["endpoint"]
    assert not upstream.requests


async def test_unauthenticated_without_a_gateway_key(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        for rpc in CHAT_RPCS:
            expect(
                await rejected(gw, rpc, chat_request(upstream.base_url)),
                grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED",
            )
        bad_key = (("authorization", "Bearer llmgw_0123456789abcdef_notarealsecret"),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.chat.Create(chat_request(upstream.base_url), timeout=10, metadata=bad_key)
        d = expect(info.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert "notarealsecret" not in d.text()
        for call in (
            gw.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(step_id="s"), timeout=10),
            gw.traces.ListProviderTraces(traces_pb2.ListProviderTracesRequest(), timeout=10),
            gw.providers.ListProviders(providers_pb2.ListProvidersRequest(), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            expect(info.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert not upstream.requests
        await assert_serving(gw.channel)


async def test_other_services_answer_with_details(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(), timeout=10)
    expect(info.value, INVALID, "INVALID_REQUEST")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(step_id="nope"), timeout=10)
    expect(info.value, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.providers.CreateProvider(providers_pb2.CreateProviderRequest(), timeout=10)
    d = details(info.value)
    assert d.code == INVALID and d.violations
