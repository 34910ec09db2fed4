"""Gemini (google_ai) end to end: the real gateway in front of the GeminiFake (loopback HTTP).

What the fake received (path, query, headers, exact JSON body), what the client got back, every
error row, the key only ever in the x-goog-api-key header, traces.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.config import RetrySettings
from tests.fakes import gemini_fake as fake
from tests.fakes.gemini_fake import GeminiFake, Reply
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

KEY = "AIzaSy" + "k" * 33
MODEL = "gemini-2.5-flash"
USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT
TOOL = chat_pb2.ROLE_TOOL
SYSTEM = chat_pb2.ROLE_SYSTEM


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiFake]:
    server = GeminiFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def settings_for(tmp_path: Path, gemini: GeminiFake, **overrides: Any) -> Any:
    return make_settings(tmp_path, google_ai_base_url=gemini.base_url, gemini_api_key=KEY, **overrides)


@pytest.fixture
async def gateway(tmp_path: Path, gemini: GeminiFake) -> AsyncIterator[RunningGateway]:
    async with running_gateway(settings_for(tmp_path, gemini)) as running:
        yield running


def config(**fields: Any) -> chat_pb2.LLMConfig:
    values: dict[str, Any] = {"model": MODEL, "model_endpoint_type": "google_ai", "context_window": 1_000_000}
    values.update(fields)
    return chat_pb2.LLMConfig(**values)


def weather_function() -> chat_pb2.FunctionDefinition:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return chat_pb2.FunctionDefinition(name="get_weather", description="Weather", parameters=params)


def request(*messages: chat_pb2.Message, **fields: Any) -> chat_pb2.CreateRequest:
    llm = fields.pop("llm_config", None) or config()
    msgs = list(messages) or [chat_pb2.Message(role=USER, content="Say hello")]
    return chat_pb2.CreateRequest(llm_config=llm, messages=msgs, **fields)


async def fail(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


async def stream_all(gw: RunningGateway, req: chat_pb2.CreateRequest) -> list[chat_pb2.StreamCreateResponse]:
    stream_req = chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())
    return [event async for event in gw.chat.StreamCreate(stream_req, timeout=10)]


async def test_create_calls_generate_content_with_the_key_in_the_header(
    gateway: RunningGateway, gemini: GeminiFake
) -> None:
    gemini.push(Reply(body=fake.response(usage=fake.usage_metadata(12, 5, thoughts=3, cached=4))))
    response = await gateway.chat.Create(request(), timeout=10)
    sent = gemini.requests[0]
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.query == {}  # never ?key=
    assert sent.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in sent.headers
    assert sent.json["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    c = response.completion
    assert c.choices[0].message.content == "Hello!"
    assert c.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (12, 8, 20)
    assert (c.usage.cached_tokens, c.usage.reasoning_tokens) == (4, 3)


SEMANTICS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "system instruction and tool turns",
        {
            "messages": [
                chat_pb2.Message(role=SYSTEM, content="Be brief."),
                chat_pb2.Message(role=USER, content="Weather in Paris?"),
                chat_pb2.Message(
                    role=ASSISTANT,
                    tool_calls=[
                        chat_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
                    ],
                ),
                chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id="c1"),
            ]
        },
        {
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
                {
                    "role": "model",
                    "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
                },
                {
                    "role": "user",
                    "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}],
                },
            ],
        },
    ),
    (
        "images inline and as fileData",
        {
            "messages": [
                chat_pb2.Message(
                    role=USER,
                    content="What is this?",
                    parts=[
                        chat_pb2.ContentPart(
                            image_url=chat_pb2.ImageUrl(url="data:image/png;base64,iVBORw0KGgo=")
                        ),
                        chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://example.com/cat.png")),
                    ],
                )
            ]
        },
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "What is this?"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png"}},
                    ],
                }
            ]
        },
    ),
    (
        "functions force a call: ANY",
        {"functions": [weather_function()]},
        {"toolConfig": {"functionCallingConfig": {"mode": "ANY"}}},
    ),
    (
        "a named function: ANY with allowedFunctionNames",
        {"functions": [weather_function()], "force_tool_call": "get_weather"},
        {"toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}},
    ),
    (
        "auto",
        {"functions": [weather_function()], "function_call": "auto"},
        {"toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [(f, e) for _, f, e in SEMANTICS], ids=[i for i, _, _ in SEMANTICS]
)
async def test_request_semantics_reach_generate_content(
    gateway: RunningGateway, gemini: GeminiFake, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    fields = dict(fields)
    messages = fields.pop("messages", ())
    await gateway.chat.Create(request(*messages, **fields), timeout=10)
    body = gemini.requests[0].json
    assert {key: body.get(key) for key in expected} == expected


async def test_generation_config(gateway: RunningGateway, gemini: GeminiFake) -> None:
    llm = config(max_tokens=256, temperature=0.3, reasoning_effort="low")
    await gateway.chat.Create(request(llm_config=llm), timeout=10)
    generation = gemini.requests[0].json["generationConfig"]
    assert generation["maxOutputTokens"] == 256
    assert generation["temperature"] == 0.3
    assert generation["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}


async def test_stream_relays_parts_and_ends_at_the_end_of_the_body(
    gateway: RunningGateway, gemini: GeminiFake
) -> None:
    gemini.push(
        Reply(
            events=[
                fake.response([{"text": "Hel"}], finish_reason=None, usage=fake.usage_metadata(12, 1)),
                fake.response([{"text": "lo there"}], usage=fake.usage_metadata(12, 4)),
            ]
        )
    )
    events = await stream_all(gateway, request())
    sent = gemini.requests[0]
    assert sent.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert sent.query == {"alt": "sse"}
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == "Hello there"
    last = events[-1].completion
    assert last.choices[0].message.content == "Hello there"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (12, 4)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_safety_block_is_content_filter(
    gateway: RunningGateway, gemini: GeminiFake, streamed: bool
) -> None:
    blocked = fake.response([{"text": ""}], finish_reason="SAFETY")
    gemini.push(Reply(events=[blocked]) if streamed else Reply(body=blocked))
    if streamed:
        completion = (await stream_all(gateway, request()))[-1].completion
    else:
        completion = (await gateway.chat.Create(request(), timeout=10)).completion
    assert completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert "SAFETY" in completion.choices[0].message.refusal


async def test_blocked_prompt_is_content_filter(gateway: RunningGateway, gemini: GeminiFake) -> None:
    gemini.push(Reply(body=fake.blocked_prompt("PROHIBITED_CONTENT")))
    completion = (await gateway.chat.Create(request(), timeout=10)).completion
    assert completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_three_step_agent_loop_with_thought_signatures(
    gateway: RunningGateway, gemini: GeminiFake, streamed: bool
) -> None:
    call = fake.response([fake.function_call("get_weather", {"city": "Paris"}, signature="c2lnLTE=")])
    answer = fake.response([{"text": "It is 21 degrees."}])
    gemini.push(
        *(
            [Reply(events=[call]), Reply(events=[answer])]
            if streamed
            else [Reply(body=call), Reply(body=answer)]
        )
    )

    async def step(*messages: chat_pb2.Message) -> chat_pb2.ChatCompletion:
        req = request(*messages, functions=[weather_function()], function_call="auto")
        if streamed:
            return (await stream_all(gateway, req))[-1].completion
        response: chat_pb2.CreateResponse = await gateway.chat.Create(req, timeout=10)
        return response.completion

    history = [chat_pb2.Message(role=USER, content="Weather in Paris?")]
    first = await step(*history)
    assert first.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    (tool_call,) = first.choices[0].message.tool_calls
    assert (tool_call.name, tool_call.thought_signature) == ("get_weather", "c2lnLTE=")
    history += [
        first.choices[0].message,
        chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id=tool_call.id),
    ]
    second = await step(*history)
    assert second.choices[0].message.content == "It is 21 degrees."
    contents = gemini.requests[1].json["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    # The signature goes back on the functionCall part (Gemini 3 refuses the turn without it).
    assert contents[1]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLTE="}
    ]
    assert contents[2]["parts"][0]["functionResponse"]["response"] == {"temp": 21}


@pytest.mark.parametrize(
    ("reply", "code", "reason"),
    [
        (
            Reply(status=400, body=fake.invalid_key()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPSTREAM_AUTH_FAILED",
        ),
        (
            Reply(
                status=404,
                body=fake.error_body(404, "models/gemini-nope is not found for API version v1beta"),
            ),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            Reply(
                status=400,
                body=fake.error_body(
                    400,
                    "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONTEXT_WINDOW_EXCEEDED",
        ),
    ],
    ids=["bad-key", "404", "token-limit"],
)
async def test_error_statuses_map_to_the_contract(
    gateway: RunningGateway, gemini: GeminiFake, reply: Reply, code: grpc.StatusCode, reason: str
) -> None:
    gemini.push(reply)
    err = await fail(gateway.chat.Create(request(), timeout=10))
    d = expect(err, code, reason)
    assert d.metadata["provider"] == "google_ai"
    assert KEY not in (err.details() or "")


async def test_429_retry_info_is_honoured(tmp_path: Path, gemini: GeminiFake) -> None:
    retry = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=10.0, max_attempts=3)
    gemini.push(Reply(status=429, body=fake.rate_limited("1s")))
    async with running_gateway(settings_for(tmp_path, gemini, retry=retry)) as gw:
        started = time.monotonic()
        response = await gw.chat.Create(request(), timeout=10)
        assert time.monotonic() - started >= 0.95
    assert response.completion.choices[0].message.content == "Hello!"
    assert len(gemini.requests) == 2


async def test_429_beyond_the_deadline_is_resource_exhausted_with_the_delay(
    gateway: RunningGateway, gemini: GeminiFake
) -> None:
    gemini.push(Reply(status=429, body=fake.rate_limited("30s")))
    err = await fail(gateway.chat.Create(request(), timeout=3))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay == pytest.approx(30.0, abs=0.01)
    assert len(gemini.requests) == 1


async def test_a_429_event_inside_a_stream_carries_googles_retry_delay(
    gateway: RunningGateway, gemini: GeminiFake
) -> None:
    # After HTTP 200 and some text: the caller gets RESOURCE_EXHAUSTED with Google's 13 s, not 1 s.
    gemini.push(
        Reply(events=[fake.response([{"text": "Half an ans"}], finish_reason=None), fake.rate_limited("13s")])
    )
    err = await fail(stream_all(gateway, request()))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay == pytest.approx(13.0, abs=0.01)
    assert (d.metadata["http_status"], d.metadata["upstream_code"]) == ("200", "429")
    assert len(gemini.requests) == 1  # the stream had started: never retried


async def test_official_endpoint_without_a_key_is_missing_api_key(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        err = await fail(gw.chat.Create(request(), timeout=10))
    d = expect(err, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "gemini_api_key"


async def test_the_key_reaches_no_trace(gateway: RunningGateway, gemini: GeminiFake) -> None:
    req = request(trace=chat_pb2.TraceContext(step_id="step-gem"))
    response = await gateway.chat.Create(req, timeout=10)
    stored = await wait_for_trace(gateway.traces, "step-gem", trace_id=response.provider_trace_id)
    assert (stored.provider, stored.model_endpoint_type) == ("google_ai", "google_ai")
    assert '"contents"' in stored.request_json
    assert KEY not in stored.request_json + stored.response_json


async def test_count_tokens_needs_no_key_and_names_the_encoding(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        count_req = chat_pb2.CountTokensRequest.FromString(request().SerializeToString())
        counted = await gw.chat.CountTokens(count_req, timeout=10)
    assert counted.prompt_tokens > 0 and counted.encoding


async def test_a_429_event_before_anything_relayed_is_retried_after_googles_delay(
    tmp_path: Path, gemini: GeminiFake
) -> None:
    # The 200's first event is the 429: nothing reached the caller, so it is retried, after
    # Google's RetryInfo (1 s) as for the same 429 as an HTTP answer, not the 0.01 s backoff.
    retry = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=10.0, max_attempts=3)
    gemini.push(Reply(events=[fake.rate_limited("1s")]))
    async with running_gateway(settings_for(tmp_path, gemini, retry=retry)) as gw:
        started = time.monotonic()
        events = await stream_all(gw, request())
        assert time.monotonic() - started >= 0.95
    assert events[-1].completion.choices[0].message.content == "Hello!"
    assert len(gemini.requests) == 2


async def test_a_429_event_before_anything_relayed_gives_up_with_googles_delay(
    tmp_path: Path, gemini: GeminiFake
) -> None:
    retry = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=10.0, max_attempts=1)
    gemini.push(Reply(events=[fake.rate_limited("13s")]))
    async with running_gateway(settings_for(tmp_path, gemini, retry=retry)) as gw:
        err = await fail(stream_all(gw, request()))
    d = expect(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert d.retry_delay == pytest.approx(13.0, abs=0.01)
