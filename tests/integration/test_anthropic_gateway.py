"""Anthropic end to end: the real gateway in front of the AnthropicFake (loopback HTTP).

What the fake received (path, headers, exact JSON body), what the client got back (typed
completion, deltas, usage normalized), every error row, keys and traces.
"""

from __future__ import annotations

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
from server.config import RetrySettings
from tests.fakes import anthropic_fake as fake
from tests.fakes.anthropic_fake import AnthropicFake, Reply, error_reply
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.trace_polling import wait_for_trace

KEY = "sk-ant-api03-" + "k" * 40
MODEL = fake.MODEL
USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT
TOOL = chat_pb2.ROLE_TOOL
SYSTEM = chat_pb2.ROLE_SYSTEM


@pytest.fixture
async def anthropic() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gateway(tmp_path: Path, anthropic: AnthropicFake) -> AsyncIterator[RunningGateway]:
    """The gateway with a server Anthropic key, its base URL pointed at the fake."""
    settings = make_settings(tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=KEY)
    async with running_gateway(settings) as running:
        yield running


def config(**fields: Any) -> chat_pb2.LLMConfig:
    values: dict[str, Any] = {"model": MODEL, "model_endpoint_type": "anthropic", "context_window": 200_000}
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


# -- Create ----------------------------------------------------------------------------------


async def test_create_sends_the_messages_api_request_and_returns_the_completion(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    usage = fake.usage(25, 12, cache_read=100, cache_write=50)
    anthropic.script(Reply(json_body=fake.message([fake.text_block("Hello!")], usage_=usage)))
    response = await gateway.chat.Create(request(), timeout=10)

    sent = anthropic.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}],
    }
    c = response.completion
    assert c.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert c.model == MODEL
    assert c.choices[0].message.content == "Hello!"
    assert c.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    # Billing: prompt_tokens includes cache reads and writes (Anthropic reports them apart).
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (175, 12, 187)
    assert (c.usage.cached_tokens, c.usage.cache_write_tokens) == (100, 50)


def _image_message() -> chat_pb2.Message:
    return chat_pb2.Message(
        role=USER,
        content="What is this?",
        parts=[
            chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="data:image/png;base64,iVBORw0KGgo=")),
            chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://example.com/cat.jpg")),
        ],
    )


def _tool_turns() -> list[chat_pb2.Message]:
    calls = [
        chat_pb2.ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Paris"}'),
        chat_pb2.ToolCall(id="toolu_2", name="get_weather", arguments='{"city": "Lyon"}'),
    ]
    return [
        chat_pb2.Message(role=SYSTEM, content="You are helpful."),
        chat_pb2.Message(role=USER, content="Weather in Paris and Lyon?"),
        chat_pb2.Message(role=ASSISTANT, tool_calls=calls),
        chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id="toolu_1"),
        chat_pb2.Message(role=TOOL, content='{"temp": 19}', tool_call_id="toolu_2"),
    ]


# (id, request fields, the expected subset of the body the fake received)
SEMANTICS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "system and tool turns merged",
        {"messages": _tool_turns()},
        {
            "system": [{"type": "text", "text": "You are helpful."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Lyon?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_2",
                            "name": "get_weather",
                            "input": {"city": "Lyon"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}'},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": '{"temp": 19}'},
                    ],
                },
            ],
        },
    ),
    (
        "images as base64 and url sources",
        {"messages": [_image_message()]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    ],
                }
            ]
        },
    ),
    (
        "functions force a tool call: any",
        {"functions": [weather_function()]},
        {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
    ),
    (
        "a named function: tool",
        {"functions": [weather_function()], "force_tool_call": "get_weather"},
        {"tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}},
    ),
    (
        "auto",
        {"functions": [weather_function()], "function_call": "auto"},
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
    ),
    ("max_tokens from the config", {"llm_config": config(max_tokens=256)}, {"max_tokens": 256}),
    ("temperature", {"llm_config": config(temperature=0.3)}, {"temperature": 0.3}),
    ("temperature clamped to 1", {"llm_config": config(temperature=1.7)}, {"temperature": 1.0}),
    (
        "reasoning_effort: a thinking budget",
        {"llm_config": config(reasoning_effort="medium")},
        {"thinking": {"type": "enabled", "budget_tokens": 8192}, "max_tokens": 8192 + 4096},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [(f, e) for _, f, e in SEMANTICS], ids=[i for i, _, _ in SEMANTICS]
)
async def test_request_semantics_reach_the_messages_api(
    gateway: RunningGateway, anthropic: AnthropicFake, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    fields = dict(fields)
    messages = fields.pop("messages", ())
    await gateway.chat.Create(request(*messages, **fields), timeout=10)
    body = anthropic.requests[0].body
    assert {key: body.get(key) for key in expected} == expected


async def test_tools_are_declared_with_their_schema(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    anthropic.script(
        Reply(
            json_body=fake.message(
                [fake.tool_use_block("get_weather", {"city": "Paris"}, "toolu_9")], stop_reason="tool_use"
            )
        )
    )
    response = await gateway.chat.Create(request(functions=[weather_function()]), timeout=10)
    (tool,) = anthropic.requests[0].body["tools"]
    assert tool["name"] == "get_weather"
    assert tool["input_schema"]["properties"]["city"] == {"type": "string"}
    choice = response.completion.choices[0]
    assert choice.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = choice.message.tool_calls
    assert (call.id, call.name) == ("toolu_9", "get_weather")
    assert call.arguments.replace(" ", "") == '{"city":"Paris"}'


# -- StreamCreate ----------------------------------------------------------------------------


async def test_stream_relays_text_and_ends_with_the_completion(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    anthropic.script(Reply(sse=fake.text_stream(["Hel", "lo", " there"])))
    events = await stream_all(gateway, request())
    assert anthropic.requests[0].body["stream"] is True
    text = "".join(e.delta.content for e in events if e.HasField("delta"))
    assert text == "Hello there"
    last = events[-1].completion
    assert last.choices[0].message.content == "Hello there"
    assert last.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (25, 15)


async def test_stream_with_thinking_and_tools(gateway: RunningGateway, anthropic: AnthropicFake) -> None:
    anthropic.script(Reply(sse=fake.thinking_tools_stream()))
    events = await stream_all(gateway, request(functions=[weather_function()], function_call="auto"))
    message = events[-1].completion.choices[0].message
    assert message.reasoning_content == "Let me think about the weather."
    assert [(b.type, b.text, b.signature) for b in message.thinking_blocks] == [
        ("thinking", "Let me think about the weather.", "EqQBCgIYAhIM1gbcDa9GJwZA")
    ]
    assert [(c.id, c.name, c.arguments) for c in message.tool_calls] == [
        ("toolu_01A", "get_weather", '{"location": "Paris"}'),
        ("toolu_01B", "get_time", '{"tz": "CET"}'),
    ]
    usage = events[-1].completion.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (622, 100, 50)
    assert events[-1].completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS


async def test_thinking_signature_goes_back_on_the_next_turn(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    thinking = fake.thinking_block("I should call the tool.", "sig-abc")
    anthropic.script(
        Reply(
            json_body=fake.message(
                [thinking, fake.tool_use_block("get_weather", {"city": "Paris"}, "toolu_1")],
                stop_reason="tool_use",
            )
        )
    )
    first = await gateway.chat.Create(
        request(functions=[weather_function()], function_call="auto"), timeout=10
    )
    answer = first.completion.choices[0].message
    assert [(b.type, b.signature) for b in answer.thinking_blocks] == [("thinking", "sig-abc")]
    turn = [
        chat_pb2.Message(role=USER, content="Weather in Paris?"),
        answer,
        chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id="toolu_1"),
    ]
    await gateway.chat.Create(
        request(*turn, functions=[weather_function()], function_call="auto"), timeout=10
    )
    assistant = anthropic.requests[1].body["messages"][1]
    assert assistant["content"][0] == {
        "type": "thinking",
        "thinking": "I should call the tool.",
        "signature": "sig-abc",
    }
    assert assistant["content"][1]["type"] == "tool_use"


# -- the agent loop --------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_three_step_agent_loop(
    gateway: RunningGateway, anthropic: AnthropicFake, streamed: bool
) -> None:
    if streamed:
        anthropic.script(
            Reply(
                sse=[
                    fake.message_start(),
                    *fake.tool_events(0, "get_weather", "toolu_7", ['{"city"', ': "Paris"}']),
                    fake.message_delta("tool_use", 20),
                    fake.MESSAGE_STOP,
                ]
            ),
            Reply(sse=fake.text_stream(["It is 21", " degrees."])),
        )
    else:
        anthropic.script(
            Reply(
                json_body=fake.message(
                    [fake.tool_use_block("get_weather", {"city": "Paris"}, "toolu_7")], stop_reason="tool_use"
                )
            ),
            Reply(json_body=fake.message([fake.text_block("It is 21 degrees.")])),
        )

    async def step(*messages: chat_pb2.Message) -> chat_pb2.ChatCompletion:
        req = request(*messages, functions=[weather_function()], function_call="auto")
        if streamed:
            return (await stream_all(gateway, req))[-1].completion
        response: chat_pb2.CreateResponse = await gateway.chat.Create(req, timeout=10)
        return response.completion

    history = [chat_pb2.Message(role=USER, content="Weather in Paris?")]
    first = await step(*history)  # 1: the model calls the tool
    (call,) = first.choices[0].message.tool_calls
    assert (call.id, call.name) == ("toolu_7", "get_weather")
    history += [
        first.choices[0].message,
        chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id=call.id),
    ]
    second = await step(*history)  # 2: the tool result goes back, 3: the answer
    assert second.choices[0].message.content == "It is 21 degrees."
    assert second.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    sent = anthropic.requests[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"][0]["id"] == "toolu_7"
    assert sent[1]["content"][0]["input"] == {"city": "Paris"}
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_7", "content": '{"temp": 21}'}
    ]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code", "reason"),
    [
        (
            error_reply(401, "authentication_error", "invalid x-api-key"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPSTREAM_AUTH_FAILED",
        ),
        (
            error_reply(404, "not_found_error", "model: claude-nope"),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            error_reply(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONTEXT_WINDOW_EXCEEDED",
        ),
        (
            error_reply(400, "invalid_request_error", "temperature: bad"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPSTREAM_REJECTED",
        ),
    ],
    ids=["401", "404", "prompt-too-long", "400"],
)
async def test_error_statuses_map_to_the_contract(
    gateway: RunningGateway, anthropic: AnthropicFake, reply: Reply, code: grpc.StatusCode, reason: str
) -> None:
    anthropic.script(reply)
    err = await fail(gateway.chat.Create(request(), timeout=10))
    d = expect(err, code, reason)
    assert d.metadata["provider"] == "anthropic"
    assert KEY not in (err.details() or "")
    assert len(anthropic.requests) == 1  # none of these is retried


async def test_529_overloaded_is_retried(gateway: RunningGateway, anthropic: AnthropicFake) -> None:
    anthropic.script(error_reply(529, "overloaded_error", "Overloaded"))
    response = await gateway.chat.Create(request(), timeout=10)
    assert response.completion.choices[0].message.content == "Hello!"
    assert len(anthropic.requests) == 2


async def test_529_until_the_attempts_run_out_is_unavailable(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    anthropic.script(*[error_reply(529, "overloaded_error", "Overloaded")] * 3)
    err = await fail(gateway.chat.Create(request(), timeout=10))
    d = expect(err, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert (d.metadata["provider"], d.metadata["http_status"]) == ("anthropic", "529")


async def test_429_retry_after_is_honoured(tmp_path: Path, anthropic: AnthropicFake) -> None:
    retry = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=10.0, max_attempts=3)
    settings = make_settings(
        tmp_path, anthropic_base_url=anthropic.base_url, anthropic_api_key=KEY, retry=retry
    )
    anthropic.script(error_reply(429, "rate_limit_error", "slow down", {"retry-after": "1"}))
    async with running_gateway(settings) as gw:
        started = time.monotonic()
        response = await gw.chat.Create(request(), timeout=10)
        assert time.monotonic() - started >= 0.95
    assert response.completion.choices[0].message.content == "Hello!"
    assert len(anthropic.requests) == 2


@pytest.mark.parametrize(
    ("error_type", "code", "reason"),
    [
        ("overloaded_error", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED"),
    ],
)
async def test_error_event_mid_stream_is_an_error_never_a_short_answer(
    gateway: RunningGateway, anthropic: AnthropicFake, error_type: str, code: grpc.StatusCode, reason: str
) -> None:
    anthropic.script(
        Reply(
            sse=[
                fake.message_start(),
                *fake.text_events(0, ["Half an ans"]),
                ("error", fake.error_body(error_type, "try later")),
            ]
        )
    )
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    seen: list[chat_pb2.StreamCreateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(stream_req, timeout=10):
            seen.append(event)
    assert not any(e.HasField("completion") for e in seen)
    d = expect(info.value, code, reason)
    assert d.metadata["provider"] == "anthropic"


async def test_stream_cut_before_message_stop_is_unavailable(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    anthropic.script(Reply(sse=[fake.message_start(), *fake.text_events(0, ["Half"])]))
    stream_req = chat_pb2.StreamCreateRequest.FromString(request().SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gateway.chat.StreamCreate(stream_req, timeout=10):
            assert not event.HasField("completion")
    expect(info.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")


# -- keys ------------------------------------------------------------------------------------


async def test_official_endpoint_without_a_key_is_missing_api_key(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        err = await fail(gw.chat.Create(request(), timeout=10))
    d = expect(err, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY")
    assert d.metadata["missing_fields"] == "anthropic_api_key"
    assert "ANTHROPIC_API_KEY" in d.message


async def test_server_key_never_goes_to_another_endpoint(tmp_path: Path, anthropic: AnthropicFake) -> None:
    other = AnthropicFake()
    await other.start()
    try:
        settings = make_settings(
            tmp_path,
            anthropic_base_url=anthropic.base_url,
            anthropic_api_key=KEY,
            allowed_endpoints=(other.base_url,),
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(request(llm_config=config(model_endpoint=other.base_url)), timeout=10)
        assert other.requests[0].headers["x-api-key"] != KEY
        assert not anthropic.requests
    finally:
        await other.stop()


async def test_byok_anthropic_provider(tmp_path: Path, anthropic: AnthropicFake) -> None:
    db = tmp_path / "gateway.db"
    async with SqliteAuthStore(path=str(db)) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    byok_key = "byok-" + secrets.token_hex(24)
    settings = make_settings(
        tmp_path,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(anthropic.base_url,),
        anthropic_api_key=KEY,  # the server's key goes to the official endpoint only
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
        llm = config(provider_name="team-claude", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK)
        trace = chat_pb2.TraceContext(step_id="step-byok")
        response = await gw.chat.Create(request(llm_config=llm, trace=trace), metadata=metadata, timeout=10)
        stored = await wait_for_trace(
            gw.traces, "step-byok", metadata=metadata, trace_id=response.provider_trace_id
        )
    assert anthropic.requests[0].headers["x-api-key"] == byok_key
    assert stored.provider == "team-claude" and stored.is_byok
    assert byok_key not in stored.request_json + stored.response_json


async def test_trace_records_the_call_without_the_key(
    gateway: RunningGateway, anthropic: AnthropicFake
) -> None:
    usage = fake.usage(25, 12, cache_read=100, cache_write=50)
    anthropic.script(Reply(json_body=fake.message([fake.text_block("Hello!")], usage_=usage)))
    req = request(trace=chat_pb2.TraceContext(step_id="step-ant"))
    response = await gateway.chat.Create(req, timeout=10)
    stored = await wait_for_trace(gateway.traces, "step-ant", trace_id=response.provider_trace_id)
    assert (stored.provider, stored.model_endpoint_type) == ("anthropic", "anthropic")
    assert '"max_tokens":4096' in stored.request_json  # the body sent upstream
    assert (stored.usage.prompt_tokens, stored.usage.cached_tokens, stored.usage.cache_write_tokens) == (
        175,
        100,
        50,
    )
    assert KEY not in stored.request_json + stored.response_json


async def test_count_tokens_counts_with_tiktoken_and_names_the_encoding(gateway: RunningGateway) -> None:
    count_req = chat_pb2.CountTokensRequest.FromString(
        request(functions=[weather_function()]).SerializeToString()
    )
    counted = await gateway.chat.CountTokens(count_req, timeout=10)
    assert counted.prompt_tokens > 0 and counted.function_tokens > 0
    assert counted.total_tokens == counted.prompt_tokens + counted.function_tokens
    assert counted.encoding  # an approximation of Claude's tokenizer, and it says which
    assert counted.context_window == 200_000
