"""The gateway against llama.cpp's real `llama-server` (issue 14): local and OpenAI-compatible paths.

Servers: `qwen_jinja` (Qwen2 tokenizer, a template with tools, --jinja) and `llama3_plain`
(Llama 3 tokenizer that adds its own BOS, a template without tools, --no-jinja). Answers are
greedy (temperature 0) from the tiny models of tests/real/tiny_models.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from llmgateway.v1 import chat_pb2, traces_pb2

from server.core import upstream_kind
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.real.conftest import LlamaServer, free_port

pytestmark = pytest.mark.real

MODEL = "tiny-local"


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


SEND_MESSAGE = chat_pb2.FunctionDefinition(
    name="send_message",
    description="Send a message to the user.",
    parameters=_struct(
        {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
    ),
)
SEARCH = chat_pb2.FunctionDefinition(
    name="search",
    description="Search the archive.",
    parameters=_struct(
        {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    ),
)
MESSAGES = [
    chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are Sam."),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hello, who are you?"),
]


@pytest.fixture(scope="module")
def spare_port() -> int:
    return free_port()


@pytest.fixture
async def gw(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    qwen_jinja: LlamaServer,
    llama3_plain: LlamaServer,
    qwen_calls: LlamaServer,
    llama3_chat: LlamaServer,
    spare_port: int,
) -> AsyncIterator[RunningGateway]:
    options = dict(getattr(request, "param", {}) or {})
    servers = (qwen_jinja, llama3_plain, qwen_calls, llama3_chat)
    urls = (*(server.url for server in servers), f"http://127.0.0.1:{spare_port}")
    settings = make_settings(
        tmp_path,
        allowed_endpoints=urls,
        upstream_timeout=60.0,
        local_exact_tokens=bool(options.get("exact")),
        tool_call_missing_retry=bool(options.get("retry")),
    )
    async with running_gateway(settings) as running:
        yield running


def local(
    server: LlamaServer, wrapper: str, *, functions: bool = True, **config: Any
) -> chat_pb2.CreateRequest:
    cfg = chat_pb2.LLMConfig(
        model=MODEL,
        model_endpoint_type="llamacpp",
        model_endpoint=server.url,
        context_window=config.pop("context_window", 4096),
        model_wrapper=wrapper,
        put_inner_thoughts_in_kwargs=True,
        temperature=0.0,
        max_tokens=config.pop("max_tokens", 256),
    )
    return chat_pb2.CreateRequest(
        llm_config=cfg,
        messages=config.pop("messages", MESSAGES),
        functions=[SEND_MESSAGE, SEARCH] if functions else [],
        trace=chat_pb2.TraceContext(step_id=config.pop("step_id", ""), agent_id="agent-real"),
        **config,
    )


def openai(
    server: LlamaServer, *, functions: bool = True, handle: str = "llamacpp/tiny", **fields: Any
) -> chat_pb2.CreateRequest:
    cfg = chat_pb2.LLMConfig(
        model=MODEL,
        model_endpoint_type="openai",
        model_endpoint=server.url + "/v1",
        handle=handle,
        context_window=fields.pop("context_window", 4096),
        temperature=0.0,
        max_tokens=fields.pop("max_tokens", 32),
    )
    return chat_pb2.CreateRequest(
        llm_config=cfg,
        messages=MESSAGES,
        functions=[SEND_MESSAGE, SEARCH] if functions else [],
        trace=chat_pb2.TraceContext(step_id=fields.pop("step_id", ""), agent_id="agent-real"),
        **fields,
    )


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, exc
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


async def trace_of(gw: RunningGateway, step_id: str) -> traces_pb2.ProviderTrace:
    for _ in range(100):
        try:
            answer = await gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=step_id), timeout=5
            )
            return answer.trace
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"no trace for {step_id}")


async def stream_all(gw: RunningGateway, req: chat_pb2.CreateRequest) -> tuple[str, chat_pb2.ChatCompletion]:
    text = ""
    final: chat_pb2.ChatCompletion | None = None
    async for event in gw.chat.StreamCreate(
        chat_pb2.StreamCreateRequest.FromString(req.SerializeToString()), timeout=60
    ):
        if event.HasField("delta"):
            text += event.delta.content
        else:
            final = event.completion
    assert final is not None
    return text, final


# -- the local path (/completion) -------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["chatml-grammar", "llama3-grammar"])
async def test_grammar_wrappers_give_a_call(
    gw: RunningGateway, qwen_jinja: LlamaServer, wrapper: str
) -> None:
    """Our (bounded) GBNF on the real grammar engine: a complete call, unary and streamed; the
    requested model name, the server's counts, unique ids."""
    answers = await asyncio.gather(
        *(
            gw.chat.Create(local(qwen_jinja, wrapper, step_id=f"g-{wrapper}-{i}"), timeout=60)
            for i in range(2)
        )
    )
    for answer in answers:
        completion = answer.completion
        assert completion.model == MODEL
        assert completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
        call = completion.choices[0].message.tool_calls[0]
        assert call.name in ("send_message", "search")
        json.loads(call.arguments)
        assert completion.usage.prompt_tokens > 100 and completion.usage.completion_tokens > 0
    assert answers[0].completion.id != answers[1].completion.id
    trace = await trace_of(gw, f"g-{wrapper}-0")
    server_answer = json.loads(trace.response_json)
    assert trace.usage.prompt_tokens == server_answer["tokens_evaluated"]
    assert server_answer["model"].endswith("qwen-tools.gguf")  # the server's name stays in the trace
    # Bounded whitespace: never more than one line break and 20 blanks in a row.
    assert "\n" * 2 not in server_answer["content"] and " " * 21 not in server_answer["content"]
    text, final = await stream_all(gw, local(qwen_jinja, wrapper))
    assert final.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert final.choices[0].message.tool_calls[0].name in ("send_message", "search")
    assert text  # the deltas carried the model's text as it came


@pytest.mark.parametrize("wrapper", ["chatml", "llama3"])
async def test_plain_wrappers_cut_at_max_tokens_are_ok_length(
    gw: RunningGateway, qwen_jinja: LlamaServer, wrapper: str
) -> None:
    """Item 4: the model never stops by itself (its end tokens are weighted down): a LENGTH stop
    with the cut text is OK/FINISH_REASON_LENGTH, unary and streamed, never a retryable error."""
    answer = await gw.chat.Create(local(qwen_jinja, wrapper, max_tokens=12), timeout=60)
    choice = answer.completion.choices[0]
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert not choice.message.tool_calls and choice.message.content
    assert answer.completion.usage.completion_tokens == 12
    _, final = await stream_all(gw, local(qwen_jinja, wrapper, max_tokens=12))
    assert final.choices[0].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 12


async def test_without_functions_the_text_is_the_answer(
    gw: RunningGateway, llama3_plain: LlamaServer
) -> None:
    answer = await gw.chat.Create(local(llama3_plain, "llama3", functions=False, max_tokens=6), timeout=60)
    assert answer.completion.model == MODEL and answer.completion.id.startswith("chatcmpl-local-")
    assert answer.completion.usage.completion_tokens == 6
    text, final = await stream_all(gw, local(llama3_plain, "llama3", functions=False, max_tokens=6))
    assert final.choices[0].message.content == text.strip() and final.usage.completion_tokens == 6


async def test_llama3_wrapper_sends_one_bos(gw: RunningGateway, llama3_plain: LlamaServer) -> None:
    """Item 5: the Llama 3 tokenizer adds its BOS; the wrapper writes none, so the server does not
    warn of a double BOS, and its prompt count is our prompt's tokens plus that one BOS."""
    await gw.chat.Create(local(llama3_plain, "llama3-grammar", step_id="bos"), timeout=60)
    trace = await trace_of(gw, "bos")
    assert "also starts with a BOS" not in llama3_plain.log()
    sent = json.loads(trace.request_json)["prompt"]
    import urllib.request

    body = json.dumps({"content": sent, "add_special": True}).encode()
    tokenized = urllib.request.Request(
        llama3_plain.url + "/tokenize", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(tokenized, timeout=10) as reply:
        tokens = json.loads(reply.read())["tokens"]
    assert tokens.count(tokens[0]) == 1  # one BOS
    assert json.loads(trace.response_json)["tokens_evaluated"] == len(tokens)


async def test_overflow_is_context_window_exceeded_with_the_servers_counts(
    gw: RunningGateway, qwen_jinja: LlamaServer
) -> None:
    """Item 1: our guard (cl100k) lets the prompt through (the caller says the window is large);
    llama-server's 400 exceed_context_size_error is CONTEXT_WINDOW_EXCEEDED with its counts,
    on the local and the OpenAI-compatible path, and its body is in the trace (item 7)."""
    big = [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hello world " * 2500)]
    for req in (
        local(qwen_jinja, "chatml", messages=big, context_window=100_000, step_id="over-local"),
        openai(qwen_jinja, functions=False, context_window=100_000, step_id="over-openai"),
    ):
        if req.llm_config.model_endpoint_type == "openai":
            del req.messages[:]
            req.messages.extend(big)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(req, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(caught.value)
        assert info.reason == "CONTEXT_WINDOW_EXCEEDED"
        assert info.metadata["context_window"] == "4096"
        assert int(info.metadata["prompt_tokens"]) > 4096
        trace = await trace_of(gw, req.trace.step_id)
        kept = json.loads(trace.response_json)
        assert kept["http_status"] == 400 and "exceed_context_size_error" in kept["body"]


@pytest.mark.parametrize("gw", [{"exact": True}], indirect=True)
async def test_exact_count_guards_with_the_servers_tokenizer(
    gw: RunningGateway, qwen_jinja: LlamaServer
) -> None:
    """Item 1, LLMGW_LOCAL_EXACT_TOKENS: the guard counts as the server does (the count it then
    reports for the prompt), and refuses before the completion when that count does not fit."""
    answer = await gw.chat.Create(local(qwen_jinja, "chatml-grammar", step_id="exact"), timeout=60)
    trace = await trace_of(gw, "exact")
    served = json.loads(trace.response_json)["tokens_evaluated"]
    assert answer.completion.usage.prompt_tokens == served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.chat.Create(local(qwen_jinja, "chatml-grammar", context_window=served - 1), timeout=60)
    info = error_info(caught.value)
    assert info.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert info.metadata["prompt_tokens"] == str(served) and info.metadata["encoding"] == "server"


async def test_killed_mid_stream_then_restarted(
    gw: RunningGateway, tiny_models: dict[str, Path], tmp_path: Path, spare_port: int
) -> None:
    """SIGKILL while a stream is open: the stream ends UNAVAILABLE (never a silent short answer);
    the server restarted on the same port answers the next call."""
    from tests.real.conftest import LlamaServer as Server

    cache = tiny_models["qwen-tools"].parents[1]
    server = Server(cache / "bin" / "llama-server", tiny_models["qwen-tools"], tmp_path / "k.log", jinja=True)
    server.port = spare_port
    server.start()
    try:
        req = local(server, "chatml", functions=False, max_tokens=4000)
        events = gw.chat.StreamCreate(
            chat_pb2.StreamCreateRequest.FromString(req.SerializeToString()), timeout=60
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in events:
                if event.HasField("delta"):
                    server.kill()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        server.start()
        answer = await gw.chat.Create(local(server, "chatml", functions=False, max_tokens=4), timeout=60)
        assert answer.completion.usage.completion_tokens == 4
    finally:
        server.stop()


# -- the OpenAI-compatible path (/v1/chat/completions) ------------------------------------------------


async def test_openai_path_without_functions(gw: RunningGateway, qwen_jinja: LlamaServer) -> None:
    """Item 7: the answer's model is the requested name, not the server's model file."""
    answer = await gw.chat.Create(openai(qwen_jinja, functions=False, step_id="oa"), timeout=60)
    assert answer.completion.model == MODEL
    assert answer.completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    trace = await trace_of(gw, "oa")
    assert json.loads(trace.response_json)["model"].endswith(".gguf")
    _, final = await stream_all(gw, openai(qwen_jinja, functions=False))
    assert final.model == MODEL and final.usage.completion_tokens == 32


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_forced_call_is_sent_as_the_forced_tool_alone_with_required(
    gw: RunningGateway, qwen_jinja: LlamaServer, rpc: str
) -> None:
    """Item 2: llama-server ignores a named tool_choice, so it gets the forced function alone with
    "required". This server then still wrote text until max_tokens (it applied no tool grammar):
    that is OK/LENGTH (item 4: the cut may be the call), not TOOL_CALL_MISSING, which needs an
    answer that stopped without a call (tests/integration/test_tool_call_check.py)."""
    step = f"forced-{rpc}"
    req = openai(qwen_jinja, force_tool_call="search", step_id=step, max_tokens=16)
    if rpc == "Create":
        completion = (await gw.chat.Create(req, timeout=60)).completion
    else:
        _, completion = await stream_all(gw, req)
    assert completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    trace = await trace_of(gw, step)
    sent = json.loads(trace.request_json)
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == ["search"]
    assert "Wrong type supplied for parameter 'tool_choice'" not in qwen_jinja.log()


async def test_tools_on_a_server_without_jinja_are_rejected_with_the_body_traced(
    gw: RunningGateway, llama3_plain: LlamaServer
) -> None:
    """Without --jinja llama-server refuses tools: the call fails with the server's reason."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.chat.Create(openai(llama3_plain, function_call="required", step_id="nojinja"), timeout=60)
    # It answers 500 (retried, then UPSTREAM_UNAVAILABLE) with the reason in its message.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tools param requires --jinja flag" in (caught.value.details() or "")
    trace = await trace_of(gw, "nojinja")
    assert trace.error_type == "UPSTREAM_UNAVAILABLE"


# -- forced calls honoured, and missing calls, against the real server ----------------------------


def _launches(server: LlamaServer) -> int:
    """Completions the server started (one log line each)."""
    return server.log().count("launch_slot_")


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_forced_call_is_honoured(gw: RunningGateway, qwen_calls: LlamaServer, rpc: str) -> None:
    """Item 2: sent as the forced function alone with "required", llama-server's tool-call
    grammar (Hermes `<tool_call>` format, detected from the template) makes the model call it:
    the answer is a real call of that function, through the gateway, unary and streamed."""
    step = f"honoured-{rpc}"
    req = openai(qwen_calls, force_tool_call="search", step_id=step, max_tokens=128)
    if rpc == "Create":
        completion = (await gw.chat.Create(req, timeout=60)).completion
    else:
        _, completion = await stream_all(gw, req)
    choice = completion.choices[0]
    assert choice.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert [call.name for call in choice.message.tool_calls] == ["search"]
    assert "query" in json.loads(choice.message.tool_calls[0].arguments)
    trace = await trace_of(gw, step)
    sent = json.loads(trace.request_json)
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == ["search"]


async def test_learned_llamacpp_gets_the_compatible_form(gw: RunningGateway, qwen_calls: LlamaServer) -> None:
    """Item 5: a handle that does not name llama.cpp. The first forced call goes with a named
    tool_choice, which llama-server ignores (it logs so, and answers as with "auto"); its answer
    (`Server: llama.cpp`) teaches the gateway what the base URL is, and the next forced call is
    sent in the form it honours. (This model calls even under "auto".)"""
    upstream_kind.forget_all()  # the earlier tests taught this process about the server
    first = openai(
        qwen_calls, handle="local/tiny", force_tool_call="search", step_id="learn-1", max_tokens=128
    )
    await gw.chat.Create(first, timeout=60)
    sent = json.loads((await trace_of(gw, "learn-1")).request_json)
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "search"}}
    assert "Wrong type supplied for parameter 'tool_choice'" in qwen_calls.log()
    second = openai(
        qwen_calls, handle="local/tiny", force_tool_call="search", step_id="learn-2", max_tokens=128
    )
    completion = (await gw.chat.Create(second, timeout=60)).completion
    assert [call.name for call in completion.choices[0].message.tool_calls] == ["search"]
    sent = json.loads((await trace_of(gw, "learn-2")).request_json)
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == ["search"]


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
@pytest.mark.parametrize("how", ["forced", "required", "default"])
async def test_a_text_answer_to_a_required_call_is_tool_call_missing(
    gw: RunningGateway, llama3_chat: LlamaServer, rpc: str, how: str
) -> None:
    """Item 2 (and 3 of the review: the gateway's default "required" counts): a template
    without tools keeps them out of the prompt, the model answers "Hello, I am Sam." and stops.
    That is UNAVAILABLE/TOOL_CALL_MISSING, never OK, with the model's text in the trace."""
    step = f"missing-{rpc}-{how}"
    fields: dict[str, Any] = {
        "forced": {"force_tool_call": "search"},
        "required": {"function_call": "required"},
    }.get(how, {})
    req = openai(llama3_chat, step_id=step, max_tokens=64, **fields)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "Create":
            await gw.chat.Create(req, timeout=60)
        else:
            await stream_all(gw, req)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "TOOL_CALL_MISSING"
    assert info.metadata["finish_reason"] == "stop" and info.metadata["called"] == ""
    assert info.metadata["tool_choice"] == ("search" if how == "forced" else "required")
    assert "Hello, I am Sam." in (caught.value.details() or "")
    trace = await trace_of(gw, step)
    assert trace.error_type == "TOOL_CALL_MISSING"
    kept = json.loads(trace.response_json)
    assert kept["choices"][0]["message"]["content"] == "Hello, I am Sam."
    assert trace.usage.completion_tokens == 7  # the server's count, kept


async def test_text_is_the_answer_when_auto_was_asked(gw: RunningGateway, llama3_chat: LlamaServer) -> None:
    """function_call "auto" asks for no call: the text answer is OK/STOP."""
    answer = await gw.chat.Create(openai(llama3_chat, function_call="auto", max_tokens=64), timeout=60)
    choice = answer.completion.choices[0]
    assert (
        choice.finish_reason == chat_pb2.FINISH_REASON_STOP and choice.message.content == "Hello, I am Sam."
    )


@pytest.mark.parametrize("gw", [{"retry": True}], indirect=True)
async def test_missing_call_is_asked_once_more_when_configured(
    gw: RunningGateway, llama3_chat: LlamaServer
) -> None:
    """LLMGW_TOOL_CALL_MISSING_RETRY: one more completion, then TOOL_CALL_MISSING (this model
    never calls); each attempt has its trace."""
    before = _launches(llama3_chat)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.chat.Create(openai(llama3_chat, force_tool_call="search", step_id="again"), timeout=60)
    assert error_info(caught.value).reason == "TOOL_CALL_MISSING"
    assert _launches(llama3_chat) - before == 2
