"""Review of issue 12 items 7, 8 and 13 (streams) end to end: a real gateway, real loopback
upstreams, real gRPC clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from llmgateway.v1 import chat_pb2

from server.auth.redact import REDACTED
from tests.echo_upstream import EchoUpstream
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_hardening_semantics import SEND
from tests.integration.test_hardening_semantics_review import RAW, SCHEMA, request_for, sse_for
from tests.integration.test_local_servers import local_request, trace_of
from tests.local_fakes import Answer, LocalServer


async def test_a_final_message_the_client_refuses_is_not_traced_as_a_success(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # 16 MiB: the final completion repeats it, over the 4 MiB a default client accepts. The
    # server's send of that message fails (the client resets the stream); the trace said success
    # anyway, because `yield last` ran after the trace was recorded. The size matters: a final
    # message that fits in HTTP/2's flow-control window (grown to a few MiB by the deltas) is
    # "sent" before the client refuses it, and grpc never tells the server (see the notes).
    upstream.script(Reply(sse=text_stream(["w" * 65536] * 256)))
    request = chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="refused-final"))
    err = None
    try:
        async for _ in gateway.chat.StreamCreate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as exc:
        err = exc
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trace = await trace_of(gateway, "refused-final")
    assert trace.error_type != "", "the refused final message was traced as a success"
    assert trace.error_type == "CANCELLED"  # the client reset the stream when it saw the size


async def test_a_local_final_message_the_client_refuses_is_not_traced_as_a_success(tmp_path: Path) -> None:
    server = LocalServer("ollama")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            big = "z" * (16 * 1024 * 1024)
            server.script(Answer(text=big, chunks=[big[i : i + 65536] for i in range(0, len(big), 65536)]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in gw.chat.StreamCreate(
                    local_request(server, functions=[], step_id="local-refused"), timeout=30
                ):
                    pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trace = await trace_of(gw, "local-refused")
            assert trace.error_type == "CANCELLED", "the refused final message was traced as a success"
    finally:
        await server.stop()


# -- final_completion_without_deltas: a real client rebuilds the whole answer ------------------


def rebuild(events: list[chat_pb2.StreamCreateResponse]) -> chat_pb2.ChatCompletion:
    """What a client does with `final_completion_without_deltas`, as the README says: a text of
    the final completion left empty is the one the deltas carried; tool call k of the final is
    the k-th tool-call index the deltas carried, in increasing order."""
    *deltas, last = events
    final = chat_pb2.ChatCompletion()
    final.CopyFrom(last.completion)
    for choice in final.choices:
        mine = [e.delta for e in deltas if e.delta.index == choice.index]
        message = choice.message
        if not message.content:
            message.content = "".join(d.content for d in mine)
        if not message.reasoning_content:
            message.reasoning_content = "".join(d.reasoning_content for d in mine)
        arguments: dict[int, str] = {}
        for d in mine:
            for fragment in d.tool_calls:
                arguments[fragment.index] = arguments.get(fragment.index, "") + fragment.arguments
        for call, index in zip(message.tool_calls, sorted(arguments), strict=True):
            if not call.arguments:
                call.arguments = arguments[index]
    return final


def _calls(*fragments: tuple[int, str, str, str]) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for index, call_id, name, arguments in fragments:
        fragment: dict[str, object] = {"index": index, "function": {"arguments": arguments}}
        if call_id:
            fragment["id"] = call_id
            fragment["type"] = "function"
            fragment["function"] = {"name": name, "arguments": arguments}
        events.append(chunk({"tool_calls": [fragment]}))
    return events


TWO_CALLS = [
    chunk({"role": "assistant", "content": None}),
    *_calls(
        (1, "call_a", "send_message", '{"message": '),
        (3, "call_b", "send_message", '{"message": "b'),
        (1, "", "", '"a"}'),
        (3, "", "", '"}'),
    ),
    chunk({}, finish_reason="tool_calls"),
    usage_chunk(),
    "[DONE]",
]
THOUGHTS = [
    chunk({"role": "assistant", "content": None}),
    *_calls(
        (0, "call_t", "send_message", '{"inner_thoughts": "I should greet", '),
        (0, "", "", '"message": "hello"}'),
    ),
    chunk({}, finish_reason="tool_calls"),
    usage_chunk(),
    "[DONE]",
]
REASONING = [
    chunk({"role": "assistant", "reasoning_content": "Let me think. "}),
    chunk({"reasoning_content": "Done."}),
    chunk({"content": "The answer "}),
    chunk({"content": "is 42."}),
    chunk({}, finish_reason="stop"),
    usage_chunk(),
    "[DONE]",
]


@pytest.mark.parametrize(
    "case", ["text", "reasoning", "two-sparse-calls", "inner-thoughts", "strict-nulls", "secret"]
)
async def test_a_client_rebuilds_the_whole_answer_from_deltas_and_final(
    tmp_path: Path, upstream: FakeUpstream, case: str
) -> None:
    key = "sk-review-" + "k7Qz" * 8
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        openai_api_key=key,
        openai_base_url=upstream.base_url,
    )
    request = chat_request(upstream.base_url)
    if case == "text":
        sse = text_stream(["Hello", ", ", "world"] * 50)
    elif case == "reasoning":
        sse = REASONING
    elif case == "two-sparse-calls":
        sse = TWO_CALLS
        request.functions.add(name="send_message", description="Send").parameters.update(SEND)
    elif case == "inner-thoughts":
        sse = THOUGHTS
        request.llm_config.put_inner_thoughts_in_kwargs = True
        request.functions.add(name="send_message", description="Send").parameters.update(SEND)
    elif case == "strict-nulls":
        sse = sse_for(RAW)
        request = request_for(upstream.base_url, SCHEMA)
    else:
        sse = text_stream(["The key is ", key[:9], key[9:], " ok", " and again " + key])
    async with running_gateway(settings) as gw:
        upstream.script(Reply(sse=sse), Reply(sse=sse))
        whole = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
        request.final_completion_without_deltas = True
        lean = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
    expected = whole[-1].completion
    rebuilt = rebuild(lean)
    assert rebuilt.choices == expected.choices
    assert key not in str(lean)
    # And it is lean: a text the deltas carried unchanged is not repeated.
    message = lean[-1].completion.choices[0].message
    if case in ("text", "reasoning", "secret"):
        assert message.content == "", case
    if case == "reasoning":
        assert message.reasoning_content == ""
    if case == "two-sparse-calls":
        assert [c.arguments for c in message.tool_calls] == ["", ""]
        assert [c.id for c in message.tool_calls] == ["call_a", "call_b"]


async def test_a_local_answer_with_a_scrubbed_key_is_still_left_out_of_the_final(tmp_path: Path) -> None:
    # The final text (scrubbed) was compared with the raw text the deltas carried before their
    # scrubbing: never equal when a key was echoed, so the whole answer came again in the final
    # message, past a default client's 4 MiB for a big answer, the very case the option is for.
    key = "local-" + "Zq81" * 8
    echo = EchoUpstream()
    await echo.start()
    try:
        settings = make_settings(
            tmp_path,
            local_auth_type="bearer_token",
            local_base_url=echo.root_url,
            local_api_key=key,
            allowed_endpoints=(echo.root_url,),
        )
        async with running_gateway(settings) as gw:
            config = chat_pb2.LLMConfig(
                model="llama",
                model_endpoint_type="llamacpp",
                model_endpoint=echo.root_url,
                context_window=8192,
            )
            request = chat_request("", llm_config=config, final_completion_without_deltas=True)
            events = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
        assert "".join(e.delta.content for e in events[:-1]) == f"you sent Bearer {REDACTED} ok"
        assert events[-1].completion.choices[0].message.content == ""
        assert key not in str(events)
    finally:
        await echo.stop()


# -- an upstream that sends nothing but keep-alive comments ----------------------------------------


@asynccontextmanager
async def keep_alive_upstream(first: bytes) -> AsyncIterator[str]:
    """An SSE upstream that sends `first`, then a keep-alive comment every 0.1 s, forever."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        while True:
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.1)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
    assert server is not None and server.sockets
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'


@pytest.mark.parametrize("first", [ROLE, b""], ids=["after-an-event", "from-the-start"])
async def test_keep_alive_comments_forever_end_within_the_upstream_timeout(
    tmp_path: Path, first: bytes
) -> None:
    # Comments are bytes, so the between-reads bound (LLMGW_UPSTREAM_TIMEOUT, no caller deadline)
    # never fired: the call was held for as long as the upstream cared to ping.
    async with keep_alive_upstream(first) as base_url:
        settings = make_settings(tmp_path, allowed_endpoints=(base_url,), upstream_timeout=1.0)
        async with running_gateway(settings) as gw:
            started = time.monotonic()

            async def read() -> None:
                async for _ in gw.chat.StreamCreate(chat_request(base_url)):
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(read(), 8)
            assert time.monotonic() - started < 4
            d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
            assert "keep-alive" in d.message


# -- amplification and the answer cap, attacked from outside ---------------------------------------


async def _outcome(
    gw: RunningGateway, request: chat_pb2.CreateRequest
) -> tuple[list[chat_pb2.StreamCreateResponse], grpc.aio.AioRpcError | None]:
    events: list[chat_pb2.StreamCreateResponse] = []
    try:
        async for event in gw.chat.StreamCreate(request, timeout=30):
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


async def test_100000_fragments_of_one_call_in_one_chunk_are_refused_fast(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    fragments = [{"index": 0, "function": {"arguments": "a"}} for _ in range(100_000)]
    fragments[0] = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    upstream.script(
        Reply(sse=[chunk({"role": "assistant", "content": "x"}), chunk({"tool_calls": fragments})])
    )
    started = time.monotonic()
    events, err = await _outcome(gateway, chat_request(upstream.base_url))
    assert err is not None
    d = expect(err, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["limit"] == "128"
    assert time.monotonic() - started < 5
    assert not any(e.delta.tool_calls for e in events)


@pytest.mark.parametrize("where", ["tool_call", "choice"])
@pytest.mark.parametrize("index", ["1", -1, True, 1.5, 1.0, None, 2**40], ids=repr)
async def test_an_index_that_is_not_a_small_natural_number_is_refused(
    gateway: RunningGateway, upstream: FakeUpstream, where: str, index: object
) -> None:
    call = {"index": index, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    if where == "tool_call":
        bad = chunk({"tool_calls": [call]})
    else:
        bad = chunk({"content": "y"})
        bad["choices"][0]["index"] = index
    upstream.script(
        Reply(
            sse=[chunk({"role": "assistant", "content": "x"}), bad, chunk({}, finish_reason="stop"), "[DONE]"]
        )
    )
    events, err = await _outcome(gateway, chat_request(upstream.base_url))
    if index is None:  # absent: the first call / choice, as OpenAI-compatible servers mean it
        assert err is None, err
        return
    assert err is not None, f"index {index!r} was accepted"
    expect(err, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")


async def test_a_unary_answer_with_17_choices_is_refused(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    body = completion("hi")
    body["choices"] = [dict(body["choices"][0], index=i) for i in range(17)]
    upstream.script(Reply(json_body=body))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["count"] == "17"


CAP = 64 * 1024


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-cap", "one-byte-over"])
async def test_the_cap_sums_reasoning_content_and_tool_calls_in_utf8_bytes(
    tmp_path: Path, upstream: FakeUpstream, extra: int
) -> None:
    # 2-, 3- and 4-byte characters, in every channel the cap counts, summing to exactly the cap.
    reasoning = "é" * 8192  # 16 KiB
    content = "€" * 5461 + "a"  # 16 KiB
    call_id, name = "call_1", "f"
    arguments = "😀" * 4096  # 16 KiB
    used = sum(len(t.encode()) for t in (reasoning, content, call_id, name, arguments))
    tail = "z" * (CAP - used + extra)
    sse = [
        chunk({"role": "assistant", "reasoning_content": reasoning}),
        chunk({"content": content}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": tail}}]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(),
        "[DONE]",
    ]
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), max_answer_bytes=CAP)
    async with running_gateway(settings) as gw:
        upstream.script(
            Reply(sse=sse),
            Reply(
                json_body=completion(
                    content,
                    reasoning_content=reasoning,
                    tool_calls=[
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": arguments + tail},
                        }
                    ],
                )
            ),
        )
        events, err = await _outcome(gw, chat_request(upstream.base_url))
        unary_error = None
        try:
            await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
        except grpc.aio.AioRpcError as exc:
            unary_error = exc
    if extra:
        assert err is not None and unary_error is not None
        for e in (err, unary_error):
            d = expect(e, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
            assert d.error_infos[0].metadata["answer_bytes"] == str(CAP + 1)
    else:
        assert err is None and unary_error is None, (err, unary_error)
        assert events[-1].completion.choices[0].message.tool_calls[0].arguments == arguments + tail
