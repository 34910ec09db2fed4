"""Local LLM servers (issue 7) through the real gateway: Create, StreamCreate and CountTokens over
gRPC, against fake servers of every endpoint type (real HTTP on loopback, see tests/local_fakes.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from llmgateway.v1 import chat_pb2, traces_pb2

from server.core import tokens
from server.providers.local.deepseek import ANSWER_INSTRUCTION
from server.providers.local.provider import prompt_parts
from server.providers.local.wrappers import FIRST_MESSAGE_PRIME, FUNCTION_BLOCK_INTRO
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.local_fakes import GRAMMAR_KINDS, KINDS, SEND_MESSAGE_OUTPUT, Answer, LocalServer

CONTEXT_WINDOW = 8192
MAX_TOKENS = 512
USER_ID = "user-42"
SECRET = "local-secret-key-0123456789"

NON_GRAMMAR_KINDS = tuple(k for k in KINDS if k not in GRAMMAR_KINDS)


# -- fixtures and helpers -------------------------------------------------------------------------


@asynccontextmanager
async def started(kind: str) -> AsyncIterator[LocalServer]:
    server = LocalServer(kind)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert not server.violations, f"{kind} received malformed requests: {server.violations}"


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, LocalServer]]:
    """One fake server per endpoint type; a malformed request to any of them fails the test."""
    running: dict[str, LocalServer] = {}
    try:
        for kind in KINDS:
            running[kind] = LocalServer(kind)
            await running[kind].start()
        yield running
    finally:
        for server in running.values():
            await server.stop()
    problems = [v for server in running.values() for v in server.violations]
    assert not problems, f"malformed requests: {problems}"


@pytest.fixture
async def gw(tmp_path: Path, servers: dict[str, LocalServer]) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, allowed_endpoints=tuple(s.root_url for s in servers.values()))
    async with running_gateway(settings) as running:
        yield running


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


FUNCTIONS = [
    chat_pb2.FunctionDefinition(
        name="send_message",
        description="Sends a message to the human user.",
        parameters=_struct(
            {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "Message contents."}},
                "required": ["message"],
            }
        ),
    ),
    chat_pb2.FunctionDefinition(
        name="conversation_search",
        description="Search prior conversation history.",
        parameters=_struct(
            {
                "type": "object",
                "properties": {"query": {"type": "string"}, "page": {"type": "integer"}},
                "required": ["query"],
            }
        ),
    ),
]

CONVERSATION = [
    chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are Sam, a helpful companion."),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="When is my birthday?"),
    chat_pb2.Message(
        role=chat_pb2.ROLE_ASSISTANT,
        content="I should search my memory.",
        tool_calls=[
            chat_pb2.ToolCall(id="call_1", name="conversation_search", arguments='{"query": "birthday"}')
        ],
    ),
    chat_pb2.Message(
        role=chat_pb2.ROLE_TOOL, content='{"status": "OK", "results": ["May 4"]}', tool_call_id="call_1"
    ),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Thanks!"),
]


def local_request(
    server: LocalServer,
    *,
    model: str = "llama3.1:8b",
    wrapper: str = "",
    functions: list[chat_pb2.FunctionDefinition] | None = None,
    messages: list[chat_pb2.Message] | None = None,
    context_window: int = CONTEXT_WINDOW,
    step_id: str = "",
    endpoint: str | None = None,
    **fields: Any,
) -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(
        model=model,
        model_endpoint_type=server.kind,
        model_endpoint=endpoint or server.base_url,
        context_window=context_window,
        model_wrapper=wrapper,
        put_inner_thoughts_in_kwargs=True,
        max_tokens=MAX_TOKENS,
    )
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=CONVERSATION if messages is None else messages,
        functions=FUNCTIONS if functions is None else functions,
        user_id=USER_ID,
        trace=chat_pb2.TraceContext(step_id=step_id, agent_id="agent-1"),
        **fields,
    )


def error_details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    """The ErrorInfo and the BadRequest field violations from the status details trailer."""
    metadata = error.trailing_metadata() or ()
    raw = next(value for key, value in metadata if key == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    info = error_details_pb2.ErrorInfo()
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return info, violations


async def trace_of(gw: RunningGateway, step_id: str) -> traces_pb2.ProviderTrace:
    """The step's trace; the writer is asynchronous, so poll (bounded)."""
    for _ in range(200):
        try:
            answer = await gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=step_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            await asyncio.sleep(0.025)
            continue
        trace: traces_pb2.ProviderTrace = answer.trace
        return trace
    pytest.fail(f"no trace for step {step_id!r} within 5 s")


def the_call(completion: chat_pb2.ChatCompletion) -> tuple[str, dict[str, Any], str]:
    """(name, arguments, content) of the one function call in a completion."""
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id
    return call.name, json.loads(call.arguments), choice.message.content


# -- 1. every endpoint type through Create, with its request shape and usage ----------------------


def _check_shape(server: LocalServer, *, stream: bool) -> None:
    sent = server.last
    body = sent.body
    kind = server.kind
    assert "<|im_start|>user\nThanks!<|im_end|>" in body["prompt"]
    assert sent.headers.get("Content-Type") == "application/json"
    if kind == "ollama":
        assert sent.path == "/api/generate"
        assert body["model"] == "llama3.1:8b"
        assert body["raw"] is True
        assert body["stream"] is stream
        assert body["options"]["num_ctx"] == CONTEXT_WINDOW
        assert body["options"]["num_predict"] == MAX_TOKENS
        assert "<|im_end|>" in body["options"]["stop"]
    elif kind == "llamacpp":
        assert sent.path == "/completion"
        assert body["stream"] is stream
        assert body["n_predict"] == MAX_TOKENS
        assert "grammar" not in body
        assert "\nFUNCTION RETURN:" in body["stop"]
    elif kind == "vllm":
        assert sent.path == "/v1/completions"  # the configured /v1 is not doubled
        assert body["model"] == "llama3.1:8b"
        assert body["user"] == USER_ID
        assert body["max_tokens"] == MAX_TOKENS
        assert body["stream"] is stream
        assert ("stream_options" in body) is stream
    elif kind == "lmstudio":
        assert sent.path == "/v1/completions"
        assert body["model"] == "llama3.1:8b"
        assert body["max_tokens"] == MAX_TOKENS
        assert body["stream"] is stream
    elif kind == "koboldcpp":
        assert sent.path == ("/api/extra/generate/stream" if stream else "/api/v1/generate")
        assert body["max_context_length"] == CONTEXT_WINDOW
        assert body["max_length"] == MAX_TOKENS
        assert "grammar" not in body
        assert "<|im_start|>" in body["stop_sequence"]
    else:
        assert sent.path == "/v1/completions"
        assert body["truncation_length"] == CONTEXT_WINDOW
        assert body["max_tokens"] == MAX_TOKENS
        assert body["stream"] is stream
        assert "grammar_string" not in body


@pytest.mark.parametrize("kind", KINDS)
async def test_create_calls_each_server_type_with_its_request_shape(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str
) -> None:
    server = servers[kind]
    request = local_request(server)
    response = await gw.chat.Create(request, timeout=20)

    assert len(server.requests) == 1
    _check_shape(server, stream=False)
    name, arguments, content = the_call(response.completion)
    assert (name, arguments, content) == ("send_message", {"message": "Hi there!"}, "The user greets me.")
    assert response.completion.model == "llama3.1:8b"
    assert response.provider_trace_id.startswith("provider_trace-")

    usage = response.completion.usage
    if kind == "koboldcpp":  # reports no counters: counted here
        counted = await gw.chat.CountTokens(
            chat_pb2.CountTokensRequest.FromString(request.SerializeToString())
        )
        encoding, _ = tokens.encoding_for_model("llama3.1:8b")
        assert usage.prompt_tokens == counted.total_tokens > 0
        assert usage.completion_tokens == len(encoding.encode_ordinary(SEND_MESSAGE_OUTPUT))
    else:  # the server's own counters
        assert (usage.prompt_tokens, usage.completion_tokens) == (42, 17)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_base_url_without_v1_gets_the_completions_path(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    webui = servers["webui"]
    await gw.chat.Create(local_request(webui, endpoint=webui.root_url), timeout=20)
    assert webui.last.path == "/v1/completions"


async def test_usage_is_counted_without_a_context_window(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["koboldcpp"]
    response = await gw.chat.Create(local_request(server, context_window=0), timeout=20)
    assert "max_context_length" not in server.last.body
    usage = response.completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0


async def test_server_error_is_reported_not_parsed(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["ollama"]
    server.script(
        Answer(status=404, error_body={"error": 'model "llama3.1:8b" not found, try pulling it first'})
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.chat.Create(local_request(server), timeout=20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (info.value.details() or "")


async def test_prompt_over_the_context_window_is_refused_before_sending(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["llamacpp"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.chat.Create(local_request(server, context_window=50), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)[0].reason == "CONTEXT_WINDOW_EXCEEDED"
    assert server.requests == []


async def test_endpoint_not_allowed_is_refused(tmp_path: Path) -> None:
    async with started("ollama") as server:
        async with running_gateway(make_settings(tmp_path)) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.chat.Create(local_request(server), timeout=20)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert server.requests == []


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vllm", "ollama", "koboldcpp"])
@pytest.mark.parametrize(
    ("auth_type", "header", "value"),
    [("", None, None), ("bearer_token", "Authorization", f"Bearer {SECRET}"), ("api_key", "api-key", SECRET)],
)
async def test_auth_modes_send_the_key_only_under_local_base_url(
    tmp_path: Path, kind: str, auth_type: str, header: str | None, value: str | None
) -> None:
    async with started(kind) as inside, started(kind) as outside:
        settings = make_settings(
            tmp_path,
            allowed_endpoints=(inside.root_url, outside.root_url),
            local_auth_type=auth_type,
            local_api_key=SECRET if auth_type else "",
            local_base_url=inside.root_url,
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(local_request(inside, step_id="inside"), timeout=20)
            await gw.chat.Create(local_request(outside, step_id="outside"), timeout=20)
            traces = [await trace_of(gw, "inside"), await trace_of(gw, "outside")]

        sent_inside = {k.lower(): v for k, v in inside.last.headers.items()}
        sent_outside = {k.lower(): v for k, v in outside.last.headers.items()}
        if header is None:
            assert "authorization" not in sent_inside and "api-key" not in sent_inside
        else:
            assert sent_inside[header.lower()] == value
            other = "api-key" if header == "Authorization" else "authorization"
            assert other not in sent_inside
        # The key belongs to local_base_url: another allowed endpoint never sees it.
        assert "authorization" not in sent_outside and "api-key" not in sent_outside
        assert all(SECRET not in json.dumps(list(r.headers.items())) for r in outside.requests)
        for trace in traces:
            assert SECRET not in trace.request_json


async def test_misconfigured_auth_is_a_clear_error(tmp_path: Path) -> None:
    async with started("vllm") as server:
        settings = make_settings(
            tmp_path,
            allowed_endpoints=(server.root_url,),
            local_auth_type="bearer_token",
            local_api_key="",
            local_base_url=server.root_url,
        )
        async with running_gateway(settings) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.chat.Create(local_request(server), timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "without a key" in (info.value.details() or "")
        assert server.requests == []


# -- 2. wrappers, grammars, first_message ----------------------------------------------------------


async def test_chatml_is_the_default_and_renders_the_conversation(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["llamacpp"]
    for wrapper in ("", "chatml"):
        await gw.chat.Create(local_request(server, wrapper=wrapper), timeout=20)
    first, second = server.requests
    assert first.prompt == second.prompt
    prompt = first.prompt
    assert prompt.startswith(
        "<|im_start|>system\nYou are Sam, a helpful companion.\n\n" + FUNCTION_BLOCK_INTRO
    )
    assert "send_message: Sends a message to the human user." in prompt
    assert "conversation_search: Search prior conversation history." in prompt
    assert "thinking (string, required)" in prompt  # inner thoughts go in the kwargs
    assert "<|im_start|>user\nWhen is my birthday?<|im_end|>\n" in prompt
    assert (
        '<|im_start|>assistant\n{"function": "conversation_search", "params": '
        '{"thinking": "I should search my memory.", "query": "birthday"}}<|im_end|>\n'
    ) in prompt
    assert (
        '<|im_start|>assistant\nFUNCTION RETURN:\n{"status": "OK", "results": ["May 4"]}<|im_end|>\n'
        in prompt
    )
    assert prompt.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    # In conversation order.
    order = ["When is my birthday?", '"function": "conversation_search"', "FUNCTION RETURN:", "Thanks!"]
    positions = [prompt.index(piece) for piece in order]
    assert positions == sorted(positions)


async def test_llama3_renders_the_conversation(gw: RunningGateway, servers: dict[str, LocalServer]) -> None:
    server = servers["ollama"]
    response = await gw.chat.Create(local_request(server, wrapper="llama3"), timeout=20)
    assert the_call(response.completion)[0] == "send_message"
    prompt = server.last.prompt
    assert prompt.startswith(  # no BOS: the server adds its own (issue 14)
        "<|start_header_id|>system<|end_header_id|>\n\nYou are Sam, a helpful companion."
    )
    assert "<|begin_of_text|>" not in prompt
    assert FUNCTION_BLOCK_INTRO in prompt
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhen is my birthday?<|eot_id|>" in prompt
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"function": "conversation_search", "params": '
        '{"thinking": "I should search my memory.", "query": "birthday"}}<|eot_id|>'
    ) in prompt
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nFUNCTION RETURN:\n" in prompt
    assert prompt.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|im_start|>" not in prompt
    assert "<|eot_id|>" in server.last.body["options"]["stop"]


@pytest.mark.parametrize("kind", GRAMMAR_KINDS)
@pytest.mark.parametrize("wrapper", ["chatml-grammar", "llama3-grammar"])
async def test_grammar_wrappers_send_a_gbnf_grammar(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str, wrapper: str
) -> None:
    server = servers[kind]
    response = await gw.chat.Create(local_request(server, wrapper=wrapper), timeout=20)
    assert the_call(response.completion)[0] == "send_message"
    grammar = server.last.grammar
    assert grammar is not None
    assert grammar.startswith("root ::= ")
    assert '"\\"send_message\\""' in grammar and '"\\"conversation_search\\""' in grammar
    assert '"\\"thinking\\""' in grammar
    field = "grammar_string" if kind == "webui" else "grammar"
    assert field in server.last.body
    opener = "<|start_header_id|>system" if wrapper.startswith("llama3") else "<|im_start|>system"
    assert server.last.prompt.startswith(opener)


@pytest.mark.parametrize("kind", NON_GRAMMAR_KINDS)
@pytest.mark.parametrize("with_functions", [True, False])
async def test_grammar_wrappers_are_refused_where_no_grammar_is_taken(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str, with_functions: bool
) -> None:
    server = servers[kind]
    request = local_request(server, wrapper="chatml-grammar", functions=None if with_functions else [])
    for call in (gw.chat.Create, gw.chat.StreamCreate):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            result = call(request, timeout=20)
            if isinstance(result, grpc.aio.UnaryStreamCall):
                async for _ in result:
                    pass
            else:
                await result
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error_info, violations = error_details(info.value)
        assert error_info.reason == "INVALID_REQUEST"
        assert [f for f, _ in violations] == ["llm_config.model_wrapper"]
    assert server.requests == []


async def test_unknown_wrapper_is_refused(gw: RunningGateway, servers: dict[str, LocalServer]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.chat.Create(local_request(servers["ollama"], wrapper="alpaca"), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error_details(info.value)[1]] == ["llm_config.model_wrapper"]


@pytest.mark.parametrize(
    ("kind", "wrapper"), [("ollama", "chatml"), ("llamacpp", "chatml-grammar"), ("vllm", "llama3")]
)
async def test_first_message_primes_with_send_message_and_the_parse_reattaches_it(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str, wrapper: str
) -> None:
    server = servers[kind]
    server.script(Answer(text=' "params": {"thinking": "Say hello first.", "message": "Hello, I am Sam!"}}'))
    response = await gw.chat.Create(local_request(server, wrapper=wrapper, first_message=True), timeout=20)

    prompt = server.last.prompt
    assert prompt.endswith(FIRST_MESSAGE_PRIME)
    assert prompt.count(FIRST_MESSAGE_PRIME) == 1
    assert the_call(response.completion) == (
        "send_message",
        {"message": "Hello, I am Sam!"},
        "Say hello first.",
    )
    if wrapper.endswith("-grammar"):  # the grammar covers only the rest of the primed object
        grammar = server.last.grammar
        assert grammar is not None
        assert grammar.startswith('root ::= ws "\\"params\\""')


async def test_first_message_answer_that_ignores_the_priming_still_parses(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["ollama"]
    server.script(Answer(text=SEND_MESSAGE_OUTPUT))  # the whole object, priming ignored
    response = await gw.chat.Create(local_request(server, first_message=True), timeout=20)
    assert the_call(response.completion) == ("send_message", {"message": "Hi there!"}, "The user greets me.")


# -- 3. parsing through the full path --------------------------------------------------------------


BROKEN_OUTPUTS = [
    pytest.param(
        '```json\n{"function": "send_message", "params": {"thinking": "Fenced.", "message": "A"}}\n```',
        ("send_message", {"message": "A"}, "Fenced."),
        id="json-fence",
    ),
    pytest.param(
        '{"function": "send_message", "params": {"thinking": "Commas.", "message": "B",},}',
        ("send_message", {"message": "B"}, "Commas."),
        id="trailing-commas",
    ),
    pytest.param(
        '{"function": "conversation_search", "params": '
        '{"thinking": "Look it up.", "query": "cats", "page": 0',
        ("conversation_search", {"query": "cats", "page": 0}, "Look it up."),
        id="missing-closing-braces",
    ),
    pytest.param(
        '{"function": "send_message", "params": {"thinking": "Two lines.", "message": "line one\nline two"}}',
        ("send_message", {"message": "line one\nline two"}, "Two lines."),
        id="raw-newline-in-string",
    ),
    pytest.param(
        'Sure! Here is my answer:\n{"function": "send_message", "params": {"thinking": "Chatty.", '
        '"message": "C"}}\nLet me know if you need more.',
        ("send_message", {"message": "C"}, "Chatty."),
        id="text-around",
    ),
    pytest.param(
        '{"function": {"name": "send_message", "arguments": '
        '{"thinking": "Nested.", "message": "D"}}}<|im_end|>',
        ("send_message", {"message": "D"}, "Nested."),
        id="nested-function-object",
    ),
]


@pytest.mark.parametrize("kind", ["ollama", "llamacpp", "webui"])
@pytest.mark.parametrize(("output", "expected"), BROKEN_OUTPUTS)
async def test_broken_outputs_parse_into_one_call(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str, output: str, expected: tuple[Any, ...]
) -> None:
    server = servers[kind]
    server.script(Answer(text=output))
    response = await gw.chat.Create(local_request(server), timeout=20)
    assert the_call(response.completion) == expected


async def test_without_functions_the_text_is_the_answer(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["lmstudio"]
    server.script(Answer(text="  Just some words.  "))
    response = await gw.chat.Create(local_request(server, functions=[]), timeout=20)
    choice = response.completion.choices[0]
    assert choice.message.content == "Just some words."
    assert not choice.message.tool_calls
    assert choice.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert FUNCTION_BLOCK_INTRO not in server.last.prompt


@pytest.mark.parametrize("kind", ["ollama", "koboldcpp", "vllm"])
async def test_unparseable_output_is_unavailable_with_the_raw_text_traced(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str
) -> None:
    server = servers[kind]
    raw = "I am not sure which function fits here, sorry."
    server.script(Answer(text=raw))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.chat.Create(local_request(server, step_id=f"bad-{kind}"), timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    error_info, _ = error_details(info.value)
    assert error_info.reason == "UNPARSEABLE_MODEL_OUTPUT"
    assert error_info.domain == "llmgateway"
    assert error_info.metadata["raw_output"] == raw

    trace = await trace_of(gw, f"bad-{kind}")
    assert trace.error_type == "UNPARSEABLE_MODEL_OUTPUT"
    assert "not a function call" in trace.error_message
    assert raw in trace.response_json
    assert trace.provider == kind


# -- 4. DeepSeek-R1 ---------------------------------------------------------------------------------


async def test_deepseek_r1_gets_functions_in_the_system_prompt(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["ollama"]
    server.script(
        Answer(
            text='<think>The user thanks me.</think>\n{"function": "send_message", '
            '"params": {"message": "You are welcome!"}}'
        )
    )
    request = local_request(server, model="deepseek-r1:14b")
    before = request.SerializeToString()
    response = await gw.chat.Create(request, timeout=20)

    assert request.SerializeToString() == before
    prompt = server.last.prompt
    system = prompt[: prompt.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nYou are Sam, a helpful companion.")
    assert "<available functions>" in system and "</available functions>" in system
    assert '"name": "send_message"' in system and '"name": "conversation_search"' in system
    assert ANSWER_INSTRUCTION in system
    # The <think> block becomes the inner thoughts when params carry none.
    assert the_call(response.completion) == (
        "send_message",
        {"message": "You are welcome!"},
        "The user thanks me.",
    )


async def test_deepseek_r1_prompting_is_on_a_copy() -> None:
    server = LocalServer("ollama")
    request = local_request(server, model="DeepSeek-R1-Distill-Qwen-7B")
    before = request.SerializeToString()
    first, _ = prompt_parts(request)
    second, _ = prompt_parts(request)
    assert first == second  # nothing accumulates across calls
    assert first[0]["content"].count("<available functions>") == 1
    assert request.SerializeToString() == before
    assert request.messages[0].content == "You are Sam, a helpful companion."
    # No system message: a new one is added in front.
    no_system = local_request(server, model="deepseek-r1", messages=list(CONVERSATION[1:]))
    messages, _ = prompt_parts(no_system)
    assert messages[0]["role"] == "system" and "<available functions>" in messages[0]["content"]
    assert len(messages) == len(CONVERSATION)


async def test_deepseek_r1_without_functions_does_not_crash(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["vllm"]
    server.script(Answer(text="<think>Simple.</think>Hello!"))
    response = await gw.chat.Create(local_request(server, model="deepseek-r1", functions=[]), timeout=20)
    assert "<available functions>" not in server.last.prompt
    assert response.completion.choices[0].message.content
    assert not response.completion.choices[0].message.tool_calls


# -- 5. StreamCreate -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_relays_deltas_as_they_come_then_one_parsed_completion(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str
) -> None:
    server = servers[kind]
    gate = asyncio.Event()
    server.script(Answer(gate=gate))
    events: list[chat_pb2.StreamCreateResponse] = []
    async for event in gw.chat.StreamCreate(local_request(server, step_id=f"stream-{kind}"), timeout=20):
        events.append(event)
        if event.HasField("delta"):
            gate.set()  # the server holds the rest of its answer until the first delta arrived here
    assert not server.violations

    _check_shape(server, stream=True)
    deltas = [e.delta.content for e in events if e.HasField("delta")]
    assert len(deltas) > 1
    assert "".join(deltas) == SEND_MESSAGE_OUTPUT
    completions = [e for e in events if e.HasField("completion")]
    assert len(completions) == 1 and events[-1] is completions[0]
    final = completions[0]
    assert the_call(final.completion) == ("send_message", {"message": "Hi there!"}, "The user greets me.")
    assert final.provider_trace_id.startswith("provider_trace-")
    usage = final.completion.usage
    if kind in ("koboldcpp", "lmstudio", "webui"):  # no usage in the stream: counted here
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    else:
        assert (usage.prompt_tokens, usage.completion_tokens) == (42, 17)

    trace = await trace_of(gw, f"stream-{kind}")
    assert trace.id == final.provider_trace_id
    assert trace.provider == kind
    assert trace.time_to_first_token_ms > 0
    assert trace.usage.total_tokens == usage.total_tokens
    assert json.loads(trace.response_json) == {"text": SEND_MESSAGE_OUTPUT}


async def test_stream_with_first_message_reattaches_the_prime(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["llamacpp"]
    server.script(Answer(text=' "params": {"thinking": "Greet.", "message": "Hey!"}}'))
    events = [e async for e in gw.chat.StreamCreate(local_request(server, first_message=True), timeout=20)]
    assert server.last.prompt.endswith(FIRST_MESSAGE_PRIME)
    assert the_call(events[-1].completion) == ("send_message", {"message": "Hey!"}, "Greet.")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["dropped", "ended-early"])
async def test_truncated_local_stream_ends_unavailable(
    gw: RunningGateway, servers: dict[str, LocalServer], kind: str, how: str
) -> None:
    server = servers[kind]
    server.script(Answer(break_after=3) if how == "dropped" else Answer(end_after=3))
    received: list[chat_pb2.StreamCreateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gw.chat.StreamCreate(
            local_request(server, step_id=f"cut-{kind}-{how}"), timeout=20
        ):
            received.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(info.value)[0].reason in ("UPSTREAM_UNAVAILABLE", "UPSTREAM_BAD_RESPONSE")
    assert not any(e.HasField("completion") for e in received)
    trace = await trace_of(gw, f"cut-{kind}-{how}")
    assert trace.error_type in ("UPSTREAM_UNAVAILABLE", "UPSTREAM_BAD_RESPONSE")
    # What came before the cut is kept with the error.
    kept = json.loads(trace.response_json)["text"]
    assert kept and SEND_MESSAGE_OUTPUT.startswith(kept)
    assert kept == "".join(e.delta.content for e in received)


async def test_stream_of_unparseable_output_ends_unavailable(
    gw: RunningGateway, servers: dict[str, LocalServer]
) -> None:
    server = servers["ollama"]
    server.script(Answer(text="no JSON here at all"))
    received: list[chat_pb2.StreamCreateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in gw.chat.StreamCreate(local_request(server, step_id="stream-bad"), timeout=20):
            received.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(info.value)[0].reason == "UNPARSEABLE_MODEL_OUTPUT"
    assert "".join(e.delta.content for e in received) == "no JSON here at all"
    trace = await trace_of(gw, "stream-bad")
    assert "no JSON here at all" in trace.response_json


# -- 6. tracing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_local_calls_are_traced(gw: RunningGateway, servers: dict[str, LocalServer], kind: str) -> None:
    server = servers[kind]
    response = await gw.chat.Create(local_request(server, step_id=f"step-{kind}"), timeout=20)
    trace = await trace_of(gw, f"step-{kind}")

    assert trace.id == response.provider_trace_id
    assert trace.provider == kind
    assert trace.model_endpoint_type == kind
    assert trace.model == "llama3.1:8b"
    assert trace.agent_id == "agent-1"
    assert trace.user_id == USER_ID
    assert trace.call_type == "agent_step"
    assert not trace.is_byok
    assert trace.latency_ms > 0
    assert not trace.error_type
    usage = response.completion.usage
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens, trace.usage.total_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert json.loads(trace.request_json) == server.last.body
    assert json.dumps(SEND_MESSAGE_OUTPUT)[1:-1] in trace.response_json  # the server's answer, as it came


# -- 7. CountTokens ---------------------------------------------------------------------------------


async def test_count_tokens_for_a_local_request(gw: RunningGateway, servers: dict[str, LocalServer]) -> None:
    server = servers["ollama"]
    request = local_request(server)
    counted = await gw.chat.CountTokens(
        chat_pb2.CountTokensRequest.FromString(request.SerializeToString()), timeout=20
    )
    assert counted.prompt_tokens > 0 and counted.function_tokens > 0
    assert counted.total_tokens == counted.prompt_tokens + counted.function_tokens
    assert counted.context_window == CONTEXT_WINDOW
    assert counted.encoding
    assert server.requests == []  # counting calls no server

    # DeepSeek-R1 prompting puts the functions in the system message too: counted.
    deepseek = local_request(server, model="deepseek-r1:14b")
    counted_r1 = await gw.chat.CountTokens(
        chat_pb2.CountTokensRequest.FromString(deepseek.SerializeToString()), timeout=20
    )
    assert counted_r1.prompt_tokens > counted.prompt_tokens
