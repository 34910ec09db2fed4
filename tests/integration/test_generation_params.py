"""Generation parameters (issue 13, point 8) end to end: validated at the edge, sent under each
provider's own names (the exact JSON each fake received), dropped parameters named in the
trace's `notes`; OpenAI's insufficient_quota 429 is not retried; a BYOK provider is called only
in the dialect it was stored with."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.store_sqlite import SqliteAuthStore
from server.core.validation import generation_violations
from server.traces.base import MAX_TRACE_NOTE_CHARS, MAX_TRACE_NOTES, trace_notes
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.fakes import anthropic_fake
from tests.fakes.anthropic_fake import AnthropicFake
from tests.fakes.anthropic_fake import Reply as AnthropicReply
from tests.fakes.gemini_fake import GeminiFake
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

USER = chat_pb2.ROLE_USER
ANTHROPIC_KEY = "sk-ant-api03-" + "k" * 40
GEMINI_KEY = "AIzaSy" + "k" * 33
SCHEMA = {
    "type": "object",
    "properties": {"city": {"$ref": "#/$defs/city"}},
    "required": ["city"],
    "additionalProperties": False,
    "$defs": {"city": {"type": "string", "description": "A city"}},
}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def json_schema_format(schema: dict[str, Any] = SCHEMA, **fields: Any) -> chat_pb2.ResponseFormat:
    spec = chat_pb2.JsonSchemaFormat(name="answer", schema=struct(schema), **fields)
    return chat_pb2.ResponseFormat(type="json_schema", json_schema=spec)


ALL: dict[str, Any] = {
    "top_p": 0.9,
    "seed": 42,
    "stop": ["END", "\n\nUser:"],
    "frequency_penalty": 0.5,
    "presence_penalty": -0.25,
}


def weather_function() -> chat_pb2.FunctionDefinition:
    params = struct({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return chat_pb2.FunctionDefinition(name="get_weather", description="Weather", parameters=params)


def request(step: str = "", **config: Any) -> chat_pb2.CreateRequest:
    functions = config.pop("functions", [])
    function_call = config.pop("function_call", "")
    values: dict[str, Any] = {"model": "gpt-4o", "model_endpoint_type": "openai", "context_window": 128_000}
    values.update(config)
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(**values),
        messages=[chat_pb2.Message(role=USER, content="Weather in Paris?")],
        functions=functions,
        function_call=function_call,
        trace=chat_pb2.TraceContext(step_id=step),
    )


def stream_request(req: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())


async def fail(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gateway(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    async with running_gateway(make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))) as gw:
        yield gw


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"top_p": math.nan}, "llm_config.top_p"),
        ({"top_p": 1.5}, "llm_config.top_p"),
        ({"top_p": -0.1}, "llm_config.top_p"),
        ({"top_p": math.inf}, "llm_config.top_p"),
        ({"frequency_penalty": 2.5}, "llm_config.frequency_penalty"),
        ({"presence_penalty": -math.inf}, "llm_config.presence_penalty"),
        ({"presence_penalty": math.nan}, "llm_config.presence_penalty"),
        ({"stop": ["x"] * 17}, "llm_config.stop"),
        ({"stop": ["ok", "y" * 257]}, "llm_config.stop[1]"),
        ({"stop": [" \n\t"]}, "llm_config.stop[0]"),
        ({"stop": [""]}, "llm_config.stop[0]"),
        ({"response_format": chat_pb2.ResponseFormat(type="xml")}, "llm_config.response_format.type"),
        (
            {"response_format": chat_pb2.ResponseFormat(type="json_schema")},
            "llm_config.response_format.json_schema.name",
        ),
        (
            {
                "response_format": chat_pb2.ResponseFormat(
                    type="json_schema", json_schema=chat_pb2.JsonSchemaFormat(name="a")
                )
            },
            "llm_config.response_format.json_schema.schema",
        ),
        (
            {"response_format": json_schema_format({"type": "object", "maximum": math.inf})},
            "llm_config.response_format.json_schema.schema.maximum",
        ),
        (
            {
                "response_format": chat_pb2.ResponseFormat(
                    type="json_object", json_schema=chat_pb2.JsonSchemaFormat(name="a")
                )
            },
            "llm_config.response_format.json_schema",
        ),
    ],
)
async def test_bad_values_are_invalid_argument_with_field_violations(
    gateway: RunningGateway, upstream: FakeUpstream, config: dict[str, Any], field: str
) -> None:
    req = request(model_endpoint=upstream.base_url, **config)
    for call in (gateway.chat.Create(req, timeout=10), gateway.chat.CountTokens(req, timeout=10)):
        d = expect(await fail(call), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert field in d.violations
    assert upstream.requests == []  # nothing was sent


async def test_a_huge_stop_list_is_refused_without_walking_it(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    req = request(model_endpoint=upstream.base_url, stop=["x" * 1000] * 60_000)
    started = time.monotonic()
    d = expect(
        await fail(gateway.chat.Create(req, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"
    )
    # One violation, not 60,000: 60 MB of stop sequences are over the serialized config's bound.
    assert list(d.violations) == ["llm_config"]
    assert time.monotonic() - started < 10


# -- OpenAI-compatible -----------------------------------------------------------------------


async def test_openai_gets_every_parameter_unary_and_stream(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(json_body=completion('{"city": "Paris"}')), Reply(sse=text_stream(['{"city"', ': "P"}']))
    )
    req = request(
        model_endpoint=upstream.base_url,
        functions=[weather_function()],
        function_call="auto",
        parallel_tool_calls=True,
        response_format=json_schema_format(strict=True),
        **ALL,
    )
    await gateway.chat.Create(req, timeout=10)
    [e async for e in gateway.chat.StreamCreate(stream_request(req), timeout=10)]
    for rec in upstream.requests:
        body = rec.body
        assert {k: body[k] for k in ALL} == ALL
        assert body["parallel_tool_calls"] is True  # the caller's choice, not the default false
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        }
    plain = request(model_endpoint=upstream.base_url, functions=[weather_function()])
    upstream.requests.clear()
    await gateway.chat.Create(plain, timeout=10)
    body = upstream.requests[0].body
    assert body["parallel_tool_calls"] is False  # the default stays as the seed sent it
    assert not {"top_p", "seed", "stop", "response_format", "frequency_penalty"} & set(body)


async def test_json_object_format(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    fmt = chat_pb2.ResponseFormat(type="json_object")
    await gateway.chat.Create(request(model_endpoint=upstream.base_url, response_format=fmt), timeout=10)
    text = chat_pb2.ResponseFormat(type="text")
    await gateway.chat.Create(request(model_endpoint=upstream.base_url, response_format=text), timeout=10)
    assert upstream.requests[0].body["response_format"] == {"type": "json_object"}
    assert "response_format" not in upstream.requests[1].body


async def test_reasoning_models_do_not_get_sampling_parameters_and_the_trace_says_so(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    req = request("o3-step", model="o3-mini", model_endpoint=upstream.base_url, **ALL)
    response = await gateway.chat.Create(req, timeout=10)
    body = upstream.requests[0].body
    assert not {"top_p", "frequency_penalty", "presence_penalty"} & set(body)
    assert (body["seed"], body["stop"]) == (42, ["END", "\n\nUser:"])
    trace = await wait_for_trace(gateway.traces, "o3-step", trace_id=response.provider_trace_id)
    assert list(trace.notes) == ["top_p", "frequency_penalty", "presence_penalty"]


async def test_a_trace_without_drops_has_no_notes(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    response = await gateway.chat.Create(
        request("plain", model_endpoint=upstream.base_url, **ALL), timeout=10
    )
    trace = await wait_for_trace(gateway.traces, "plain", trace_id=response.provider_trace_id)
    assert list(trace.notes) == []


# -- Anthropic -------------------------------------------------------------------------------


@pytest.fixture
async def anthropic() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_anthropic_parameters_and_trace_notes(tmp_path: Path, anthropic: AnthropicFake) -> None:
    settings = make_settings(tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=ANTHROPIC_KEY)
    anthropic.script(
        AnthropicReply(json_body=anthropic_fake.message([anthropic_fake.text_block('{"city": "Paris"}')])),
        AnthropicReply(sse=anthropic_fake.text_stream(['{"city":', ' "Paris"}'])),
    )
    req = request(
        "ant-step",
        model="claude-sonnet-4-5",
        model_endpoint_type="anthropic",
        functions=[weather_function()],
        function_call="auto",
        response_format=json_schema_format(),
        **ALL,
    )
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(req, timeout=10)
        trace = await wait_for_trace(gw.traces, "ant-step", trace_id=response.provider_trace_id)
        events = [e async for e in gw.chat.StreamCreate(stream_request(req), timeout=10)]
    assert response.completion.choices[0].message.content == '{"city": "Paris"}'
    assert events[-1].completion.choices[0].message.content == '{"city": "Paris"}'
    for rec in anthropic.requests:
        body = rec.body
        assert body["stop_sequences"] == ["END", "\n\nUser:"]
        assert body["top_p"] == 0.9
        # parallel_tool_calls false (the default) is Anthropic's disable_parallel_tool_use.
        assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
        assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
        assert not {"seed", "frequency_penalty", "presence_penalty", "response_format"} & set(body)
    assert sorted(trace.notes) == ["frequency_penalty", "presence_penalty", "seed"]


async def test_anthropic_drops_thinking_when_a_tool_is_forced_and_notes_it(
    tmp_path: Path, anthropic: AnthropicFake
) -> None:
    settings = make_settings(tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=ANTHROPIC_KEY)
    anthropic.script(
        AnthropicReply(
            json_body=anthropic_fake.message(
                [anthropic_fake.tool_use_block("get_weather", {"city": "Paris"}, "toolu_1")],
                stop_reason="tool_use",
            )
        )
    )
    req = request(
        "ant-forced",
        model="claude-sonnet-4-5",
        model_endpoint_type="anthropic",
        functions=[weather_function()],
        function_call="required",
        reasoning_effort="high",
    )
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(req, timeout=10)
        trace = await wait_for_trace(gw.traces, "ant-forced", trace_id=response.provider_trace_id)
    body = anthropic.requests[0].body
    assert body["tool_choice"]["type"] == "any"
    assert "thinking" not in body
    assert list(trace.notes) == ["reasoning_effort"]


# -- Gemini ----------------------------------------------------------------------------------


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiFake]:
    server = GeminiFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_gemini_generation_config(tmp_path: Path, gemini: GeminiFake) -> None:
    settings = make_settings(tmp_path, google_ai_base_url=gemini.base_url, gemini_api_key=GEMINI_KEY)
    base: dict[str, Any] = {"model": "gemini-2.5-flash", "model_endpoint_type": "google_ai"}
    async with running_gateway(settings) as gw:
        await gw.chat.Create(request(response_format=json_schema_format(), **base, **ALL), timeout=10)
        json_object = chat_pb2.ResponseFormat(type="json_object")
        await gw.chat.Create(request(response_format=json_object, **base), timeout=10)
        # Gemini's seed is an int32; a larger one is refused rather than sent to fail upstream.
        err = await fail(gw.chat.Create(request(seed=2**40, **base), timeout=10))
        expect(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        # A schema whose $refs double at each of 30 levels: refused at once, not inlined (2**30).
        defs = {
            f"d{i}": {
                "type": "object",
                "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}},
            }
            for i in range(30)
        }
        defs["d30"] = {"type": "string"}
        bomb = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}
        started = time.monotonic()
        err = await fail(
            gw.chat.Create(request(response_format=json_schema_format(bomb), **base), timeout=10)
        )
        d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert d.metadata["keyword"] == "$ref"
        assert time.monotonic() - started < 5
    assert len(gemini.requests) == 2
    config = gemini.requests[0].json["generationConfig"]
    assert config["topP"] == 0.9
    assert config["seed"] == 42
    assert config["stopSequences"] == ["END", "\n\nUser:"]
    assert (config["frequencyPenalty"], config["presencePenalty"]) == (0.5, -0.25)
    assert config["responseMimeType"] == "application/json"
    # The $ref is inlined (Gemini's schema has none), additionalProperties false dropped.
    assert config["responseSchema"]["properties"]["city"]["type"] == "STRING"
    assert "$ref" not in str(config["responseSchema"])
    assert gemini.requests[1].json["generationConfig"]["responseMimeType"] == "application/json"
    assert "responseSchema" not in gemini.requests[1].json["generationConfig"]


# -- Groq, DeepSeek, Azure --------------------------------------------------------------------


class GroqFake(FakeUpstream):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openai/v1"


async def test_groq_and_deepseek_parameters(tmp_path: Path) -> None:
    groq, deepseek = GroqFake(), FakeUpstream()
    await groq.start()
    await deepseek.start()
    try:
        settings = make_settings(
            tmp_path,
            groq_base_url=groq.base_url,
            groq_api_key="gsk_" + "g" * 52,
            deepseek_base_url=deepseek.base_url,
            deepseek_api_key="sk-" + "d" * 32,
        )
        async with running_gateway(settings) as gw:
            fmt = chat_pb2.ResponseFormat(type="json_object")
            await gw.chat.Create(
                request(
                    model="llama-3.3-70b-versatile", model_endpoint_type="groq", response_format=fmt, **ALL
                ),
                timeout=10,
            )
            await gw.chat.Create(
                request(model="deepseek-chat", model_endpoint_type="deepseek", response_format=fmt, **ALL),
                timeout=10,
            )
            reasoner = await gw.chat.Create(
                request(
                    "ds-r", model="deepseek-reasoner", model_endpoint_type="deepseek", temperature=0.3, **ALL
                ),
                timeout=10,
            )
            trace = await wait_for_trace(gw.traces, "ds-r", trace_id=reasoner.provider_trace_id)
            # DeepSeek's JSON output takes json_object only: a schema would not be enforced.
            schema_req = request(
                model="deepseek-chat", model_endpoint_type="deepseek", response_format=json_schema_format()
            )
            d = expect(
                await fail(gw.chat.Create(schema_req, timeout=10)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_REQUEST",
            )
            assert d.metadata["provider"] == "deepseek"
        for rec in (groq.requests[0], deepseek.requests[0]):
            assert {k: rec.body[k] for k in ALL} == ALL
            assert rec.body["response_format"] == {"type": "json_object"}
        body = deepseek.requests[1].body
        assert not {"temperature", "top_p", "frequency_penalty", "presence_penalty"} & set(body)
        assert (body["seed"], body["stop"]) == (42, ["END", "\n\nUser:"])
        assert list(trace.notes) == ["temperature", "top_p", "frequency_penalty", "presence_penalty"]
        assert len(deepseek.requests) == 2
    finally:
        await groq.stop()
        await deepseek.stop()


# -- local servers ----------------------------------------------------------------------------


async def test_llamacpp_gets_sampling_and_stops_and_refuses_a_json_format(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body={"content": "Sunny.", "stop": True, "tokens_predicted": 2}))
    base: dict[str, Any] = {
        "model": "local",
        "model_endpoint_type": "llamacpp",
        "model_endpoint": upstream.base_url,
    }
    await gateway.chat.Create(request(**base, **ALL), timeout=10)
    body = upstream.requests[0].body
    assert {k: body[k] for k in ("top_p", "seed", "frequency_penalty", "presence_penalty")} == {
        "top_p": 0.9, "seed": 42, "frequency_penalty": 0.5, "presence_penalty": -0.25
    }  # fmt: skip
    assert body["stop"][-2:] == ["END", "\n\nUser:"]  # after the wrapper's own stops
    fmt = chat_pb2.ResponseFormat(type="json_object")
    err = await fail(gateway.chat.Create(request(**base, response_format=fmt), timeout=10))
    d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert list(d.violations) == ["llm_config.response_format.type"]
    assert len(upstream.requests) == 1


# -- insufficient_quota ------------------------------------------------------------------------

QUOTA_BODY = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_insufficient_quota_is_not_retried(
    gateway: RunningGateway, upstream: FakeUpstream, streamed: bool
) -> None:
    upstream.script(*[Reply(status=429, json_body=QUOTA_BODY, headers={"Retry-After": "1"})] * 3)
    req = request(model_endpoint=upstream.base_url)
    if streamed:
        call: Any = _drain(gateway.chat.StreamCreate(stream_request(req), timeout=10))
    else:
        call = gateway.chat.Create(req, timeout=10)
    d = expect(await fail(call), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert len(upstream.requests) == 1  # attempted once: waiting never refills a quota
    assert d.metadata["upstream_code"] == "insufficient_quota"
    assert d.metadata["http_status"] == "429"
    assert d.retry_delay is None  # no RetryInfo: retrying later does not help
    assert "exceeded your current quota" in d.message


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_a_plain_429_is_still_retried(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            status=429,
            json_body={
                "error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
            },
        )
    )
    await gateway.chat.Create(request(model_endpoint=upstream.base_url), timeout=10)
    assert len(upstream.requests) == 2


# -- BYOK dialect -------------------------------------------------------------------------------


async def test_a_byok_provider_is_called_only_in_its_stored_dialect(
    tmp_path: Path, anthropic: AnthropicFake
) -> None:
    async with SqliteAuthStore(path=str(tmp_path / "gateway.db")) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    byok_key = "sk-ant-byok-" + secrets.token_hex(24)
    settings = make_settings(
        tmp_path,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(anthropic.base_url,),
    )
    async with running_gateway(settings) as gw:
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="team-claude",
                model_endpoint_type="anthropic",
                base_url=anthropic.base_url,
                api_key=byok_key,
            ),
            metadata=metadata,
            timeout=10,
        )
        byok: dict[str, Any] = {
            "provider_name": "team-claude",
            "provider_category": chat_pb2.PROVIDER_CATEGORY_BYOK,
        }
        for wrong in ("openai", "google_ai", "groq"):
            req = request(model="claude-sonnet-4-5", model_endpoint_type=wrong, **byok)
            err = await fail(gw.chat.Create(req, timeout=10, metadata=metadata))
            d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
            assert (d.metadata["model_endpoint_type"], d.metadata["provider_endpoint_type"]) == (
                wrong,
                "anthropic",
            )
            assert list(d.violations) == ["llm_config.model_endpoint_type"]
            assert byok_key not in d.message + str(d.metadata)
        assert anthropic.requests == []  # the key never went out in another dialect's header
        ok = request(model="claude-sonnet-4-5", model_endpoint_type="anthropic", **byok)
        await gw.chat.Create(ok, timeout=10, metadata=metadata)
    (rec,) = anthropic.requests
    assert rec.path == "/v1/messages"
    assert rec.headers["x-api-key"] == byok_key


def test_trace_notes_are_bounded_and_scrubbed() -> None:
    key = "sk-proj-" + "s" * 40
    notes = trace_notes(
        [f"seed {key}", "n" * 5000, *["x"] * 100], lambda text: text.replace(key, "[REDACTED]")
    )
    assert notes[0] == "seed [REDACTED]"
    assert len(notes[1]) == MAX_TRACE_NOTE_CHARS
    assert len(notes) == MAX_TRACE_NOTES


def test_a_response_schema_over_the_size_bound_is_refused() -> None:
    props = {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(3000)}
    cfg = chat_pb2.LLMConfig(response_format=json_schema_format({"type": "object", "properties": props}))
    assert [v.field for v in generation_violations(cfg)] == ["llm_config.response_format.json_schema.schema"]
