"""Review of issue 13 (providers), attacker-minded: each test is a defect found or a row of the
issue's "Tests that must exist" that had no test, through the real gateway and the real fakes.

- a too-long prompt is CONTEXT_WINDOW_EXCEEDED on every provider (point 7): OpenAI, Groq and
  DeepSeek answered UPSTREAM_REJECTED; Anthropic's "input length and `max_tokens` exceed context
  limit" too;
- Gemini's `$ref` inlining bound was per schema: many small functions each expanding to just
  under it froze the event loop for seconds (a 62 KB request: 2.6 s); a huge tool set's schema
  conversion ran on the loop (0.5 s for the 10 MB set) although everything else about it is
  offloaded;
- Gemini rows without a test: 503 retried, an error event after the 200, a blocked prompt in a
  stream.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.providers import gemini
from tests.fake_upstream import FakeUpstream
from tests.fake_upstream import Reply as OpenAIReply
from tests.fakes import anthropic_fake
from tests.fakes import gemini_fake as gfake
from tests.fakes.anthropic_fake import AnthropicFake
from tests.fakes.gemini_fake import GeminiFake
from tests.fakes.gemini_fake import Reply as GeminiReply
from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_hardening_loop_review import huge_tool_set
from tests.integration.test_hardening_tokens import MAX_GAP_S, as_task, health_check, tiny_calls_while

USER = chat_pb2.ROLE_USER
KEYS = {
    "openai": "sk-proj-" + "o" * 40,
    "groq": "gsk_" + "g" * 52,
    "deepseek": "sk-" + "d" * 32,
}
GEMINI_KEY = "AIza" + "G" * 35
ANTHROPIC_KEY = "sk-ant-api03-" + "k" * 40


@pytest.fixture
async def openai_family() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gemini_server() -> AsyncIterator[GeminiFake]:
    server = GeminiFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def anthropic_server() -> AsyncIterator[AnthropicFake]:
    server = AnthropicFake()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _request(endpoint_type: str, model: str, window: int, *functions: Any) -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(model=model, model_endpoint_type=endpoint_type, context_window=window)
    # "auto": these tests are about a text answer with tools offered (the fakes answer a call
    # under the gateway's default "required", as the real APIs do).
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=[chat_pb2.Message(role=USER, content="Say hello")],
        functions=functions,
        function_call="auto" if functions else "",
    )


def _as_stream(request: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())


async def _outcome(gw: Any, request: chat_pb2.CreateRequest, streamed: bool) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if streamed:
            async for event in gw.chat.StreamCreate(_as_stream(request), timeout=10):
                assert not event.HasField("completion")
        else:
            await gw.chat.Create(request, timeout=10)
    return info.value


# -- context length, OpenAI dialect ----------------------------------------------------------

# What each provider answers for a prompt over the model's window (public bug reports quote them
# verbatim: OpenAI and Groq put `code: context_length_exceeded`, DeepSeek only says it in words).
_OPENAI_TOO_LONG = {
    "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in "
    "130512 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}
_GROQ_TOO_LONG = {
    "message": "Please reduce the length of the messages or completion.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}
_DEEPSEEK_TOO_LONG = {
    "message": "This model's maximum context length is 131072 tokens. However, you requested 131134 tokens "
    "(122942 in the messages, 8192 in the completion). Please reduce the length of the messages or "
    "completion.",
    "type": "invalid_request_error",
    "param": None,
    "code": "invalid_request_error",
}


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("endpoint_type", "model", "error"),
    [
        ("openai", "gpt-4o-mini", _OPENAI_TOO_LONG),
        ("groq", "llama-3.3-70b-versatile", _GROQ_TOO_LONG),
        ("deepseek", "deepseek-chat", _DEEPSEEK_TOO_LONG),
    ],
    ids=["openai", "groq", "deepseek"],
)
async def test_openai_dialect_prompt_too_long_is_context_window_exceeded(
    tmp_path: Path,
    openai_family: FakeUpstream,
    endpoint_type: str,
    model: str,
    error: dict[str, Any],
    streamed: bool,
) -> None:
    settings = make_settings(
        tmp_path,
        **{
            f"{endpoint_type}_base_url": openai_family.base_url,
            f"{endpoint_type}_api_key": KEYS[endpoint_type],
        },
    )
    openai_family.script(OpenAIReply(status=400, json_body={"error": error}))
    async with running_gateway(settings) as gw:
        # The gateway's own guard passes (a huge window): the provider's tokenizer says no.
        err = await _outcome(gw, _request(endpoint_type, model, 10_000_000), streamed)
    d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED")
    assert d.metadata["provider"] == endpoint_type
    assert d.metadata["http_status"] == "400"
    assert error["message"] in d.message
    assert KEYS[endpoint_type] not in (err.details() or "")
    assert len(openai_family.requests) == 1  # not retried


async def test_openai_dialect_other_400s_stay_upstream_rejected(
    tmp_path: Path, openai_family: FakeUpstream
) -> None:
    # The mapping reads the provider's code or its "maximum context length" sentence, nothing
    # looser: a 400 that merely mentions the context is still the provider refusing the request.
    settings = make_settings(tmp_path, openai_base_url=openai_family.base_url, openai_api_key=KEYS["openai"])
    body = {"message": "Invalid 'max_tokens': the context is fine", "type": "invalid_request_error"}
    openai_family.script(OpenAIReply(status=400, json_body={"error": {**body, "code": "invalid_value"}}))
    async with running_gateway(settings) as gw:
        err = await _outcome(gw, _request("openai", "gpt-4o-mini", 128_000), False)
    expect(err, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED")


# -- context length, Anthropic ----------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_anthropic_input_plus_max_tokens_over_the_window_is_context_window_exceeded(
    tmp_path: Path, anthropic_server: AnthropicFake, streamed: bool
) -> None:
    # Anthropic counts max_tokens against the window: with thinking "high" the gateway's default
    # max_tokens is 20,480, so a 180k-token history on a 200k model gets this 400.
    message = (
        "input length and `max_tokens` exceed context limit: 178959 + 20480 > 200000, "
        "decrease input length or `max_tokens` and try again"
    )
    anthropic_server.script(anthropic_fake.error_reply(400, "invalid_request_error", message))
    settings = make_settings(
        tmp_path, anthropic_base_url=anthropic_server.base_url, anthropic_api_key=ANTHROPIC_KEY
    )
    async with running_gateway(settings) as gw:
        err = await _outcome(gw, _request("anthropic", anthropic_fake.MODEL, 200_000), streamed)
    d = expect(err, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED")
    assert d.metadata["provider"] == "anthropic"
    assert (d.metadata["prompt_tokens"], d.metadata["context_window"]) == ("178959", "200000")
    assert d.metadata["max_tokens"] == "20480"
    assert len(anthropic_server.requests) == 1


# -- Gemini: schema inlining and the event loop -------------------------------------------------


def _ref_bomb(levels: int) -> struct_pb2.Struct:
    """~1 KB: definitions that each use the next one twice; 2**levels nodes once inlined."""
    defs: dict[str, Any] = {
        f"d{k}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{k + 1}"}, "b": {"$ref": f"#/$defs/d{k + 1}"}},
            "required": ["a", "b"],
        }
        for k in range(levels)
    }
    defs[f"d{levels}"] = {"type": "string"}
    params = struct_pb2.Struct()
    params.update(
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "required": ["x"], "$defs": defs}
    )
    return params


async def test_many_schemas_each_just_under_the_inlining_bound_are_refused_without_freezing(
    tmp_path: Path, gemini_server: GeminiFake
) -> None:
    # 12 levels is ~16,000 nodes once inlined, under the per-schema bound of 20,000; 60 such
    # functions (70 KB of request) were ~1,000,000 nodes converted on the event loop (9 s here)
    # into a Gemini body of ~60 MB.
    functions = [chat_pb2.FunctionDefinition(name=f"tool_{i}", parameters=_ref_bomb(12)) for i in range(60)]
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        big = as_task(
            gw.chat.Create(_request("google_ai", "gemini-2.5-flash", 1_000_000, *functions), timeout=120)
        )
        completed, worst = await tiny_calls_while(big, health_check(gw.channel))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await big
    d = expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert d.metadata["keyword"] == "$ref"
    assert gemini_server.requests == []
    assert worst < MAX_GAP_S, f"a health check waited {worst:.2f} s behind the schema conversion"
    del completed  # the refusal may come before the first health check: the gap is the criterion


async def test_a_schema_just_under_the_bound_still_converts(
    tmp_path: Path, gemini_server: GeminiFake
) -> None:
    # The per-request budget does not refuse what the per-schema bound accepted alone (10 levels:
    # ~4,000 nodes once inlined, a 300 KB Gemini body).
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        request = _request(
            "google_ai",
            "gemini-2.5-flash",
            1_000_000,
            chat_pb2.FunctionDefinition(name="t", parameters=_ref_bomb(10)),
        )
        answer = await gw.chat.Create(request, timeout=30)
    assert answer.completion.choices[0].message.content == "Hello!"
    sent = gemini_server.requests[0].json["tools"][0]["functionDeclarations"][0]["parameters"]
    assert sent["properties"]["x"]["properties"]["a"]["type"] == "OBJECT"


async def test_huge_tool_set_is_translated_for_gemini_off_the_event_loop(
    tmp_path: Path, gemini_server: GeminiFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway offloads a huge function set's validation, conversion and count; the Gemini
    # schema conversion of the same set (~0.5 s of CPU for 10 MB) ran on the loop.
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []
    original = gemini.convert_schema

    def recorded(*args: Any, **kwargs: Any) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(gemini, "convert_schema", recorded)
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        request = _request("google_ai", "gemini-2.5-flash", 50_000_000, *huge_tool_set())
        answer = await gw.chat.Create(request, timeout=120)
    assert answer.completion.choices[0].message.content == "Hello!"
    assert len(gemini_server.requests[0].json["tools"][0]["functionDeclarations"]) == 1000
    assert threads and loop_thread not in threads


# -- Gemini rows that had no test ---------------------------------------------------------------


async def test_gemini_503_is_retried(tmp_path: Path, gemini_server: GeminiFake) -> None:
    gemini_server.push(GeminiReply(status=503, body=gfake.error_body(503, "The model is overloaded.")))
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        answer = await gw.chat.Create(_request("google_ai", "gemini-2.5-flash", 1_000_000), timeout=10)
    assert answer.completion.choices[0].message.content == "Hello!"
    assert len(gemini_server.requests) == 2


@pytest.mark.parametrize(
    ("code", "grpc_code", "reason"),
    [
        (503, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED"),
    ],
)
async def test_gemini_error_event_after_the_200_is_an_error_never_a_short_answer(
    tmp_path: Path, gemini_server: GeminiFake, code: int, grpc_code: grpc.StatusCode, reason: str
) -> None:
    gemini_server.push(
        GeminiReply(
            events=[
                gfake.response([{"text": "Half an ans"}], finish_reason=None),
                gfake.error_body(code, "try later"),
            ]
        )
    )
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        err = await _outcome(gw, _request("google_ai", "gemini-2.5-flash", 1_000_000), True)
    d = expect(err, grpc_code, reason)
    assert d.metadata["provider"] == "google_ai"
    assert GEMINI_KEY not in (err.details() or "")


async def test_gemini_blocked_prompt_in_a_stream_is_content_filter(
    tmp_path: Path, gemini_server: GeminiFake
) -> None:
    gemini_server.push(GeminiReply(events=[gfake.blocked_prompt("PROHIBITED_CONTENT")]))
    settings = make_settings(tmp_path, google_ai_base_url=gemini_server.base_url, gemini_api_key=GEMINI_KEY)
    async with running_gateway(settings) as gw:
        request = _as_stream(_request("google_ai", "gemini-2.5-flash", 1_000_000))
        events = [event async for event in gw.chat.StreamCreate(request, timeout=10)]
    completion = events[-1].completion
    assert completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert "PROHIBITED_CONTENT" in completion.choices[0].message.refusal
