"""Review of issue 12 item 13 through the real gateway: an upstream that echoes the key it was
sent, placed where the stream scrubber let it out (a tool call stopping halfway through the key
while another call starts; the key split inside a tool-call name; the key followed by the rest
of a longer known secret that starts with it)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2

from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.trace_polling import wait_for_trace

Script = Callable[[str], list[dict[str, Any]]]  # the key received -> the delta of each SSE chunk


class ScriptedEcho:
    """`/v1/chat/completions` streaming the deltas a script makes of the key it received."""

    def __init__(self) -> None:
        self.script: Script = lambda key: [{"content": key}]
        self.unary: Callable[[str], dict[str, Any]] | None = None  # the answer to a Create
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        assert isinstance(server, asyncio.Server) and server.sockets
        self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.unary is not None and not (await request.json()).get("stream"):
            return web.json_response(self.unary(key))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = self.script(key)
        for number, delta in enumerate(deltas):
            finish = delta.pop("finish_reason", None)
            index = delta.pop("choice_index", 0)
            chunk: dict[str, Any] = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-mini",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
            }
            if number == len(deltas) - 1:
                chunk["usage"] = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)  # one chunk per read: the boundaries are the script's
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedEcho]:
    server = ScriptedEcho()
    await server.start()
    yield server
    await server.stop()


def _call(index: int, arguments: str, call_id: str = "", name: str = "") -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        fragment["id"] = call_id
        fragment["type"] = "function"
    if name:
        fragment["function"]["name"] = name
    return fragment


def _switching(key: str) -> list[dict[str, Any]]:
    return [
        {"tool_calls": [_call(0, '{"message": "' + key[:20], "c0", "send_message")]},
        {"tool_calls": [_call(1, '{"message": "hi"}', "c1", "send_message")]},
        {"tool_calls": [_call(0, key[20:] + '"}')]},
        {"finish_reason": "tool_calls"},
    ]


def _split_name(key: str) -> list[dict[str, Any]]:
    return [
        {"tool_calls": [_call(0, "", "c0", "send_" + key[:20])]},
        {"tool_calls": [{"index": 0, "function": {"name": key[20:]}}]},
        {"tool_calls": [_call(0, '{"message": "hi"}')]},
        {"finish_reason": "tool_calls"},
    ]


SEND = chat_pb2.FunctionDefinition(name="send_message", description="Say something")
SEND.parameters.update({"type": "object", "properties": {"message": {"type": "string"}}})


@pytest.mark.parametrize("script", [_switching, _split_name], ids=["index-switch", "split-name"])
async def test_a_key_split_in_tool_call_fragments_never_reaches_the_caller(
    tmp_path: Path, upstream: ScriptedEcho, script: Script
) -> None:
    key = "sk-proj-" + secrets.token_urlsafe(36)
    upstream.script = script
    settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=upstream.base_url)
    async with running_gateway(settings) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=upstream.base_url
        )
        request = chat_request(
            "", llm_config=config, functions=[SEND], trace=chat_pb2.TraceContext(step_id="s")
        )
        stream = gw.chat.StreamCreate(chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()))
        events = [event async for event in stream]
        fields: dict[tuple[int, str], str] = {}
        for event in events[:-1]:
            for fragment in event.delta.tool_calls:
                for name in ("arguments", "name", "id"):
                    fields[(fragment.index, name)] = fields.get((fragment.index, name), "") + getattr(
                        fragment, name
                    )
        trace = await wait_for_trace(gw.traces, "s", metadata=None)
    seen = [e.SerializeToString().decode("latin-1") for e in events] + list(fields.values())
    seen.append(json_format.MessageToJson(trace))
    assert not [text for text in seen if key[8:28] in text or key[20:] in text], fields


async def test_a_key_that_starts_a_longer_known_secret_is_not_cut_in_a_stream(
    tmp_path: Path, upstream: ScriptedEcho
) -> None:
    # The encryption passphrase happens to start with the server key; the upstream echoes the key
    # in one chunk and the rest of the passphrase in the next.
    key = "sk-proj-" + secrets.token_urlsafe(36)
    rest = "-" + secrets.token_hex(12)
    upstream.script = lambda got: [
        {"content": "x " + got},
        {"content": rest + " y"},
        {"finish_reason": "stop"},
    ]
    settings = make_settings(
        tmp_path, openai_api_key=key, openai_base_url=upstream.base_url, encryption_key=key + rest
    )
    async with running_gateway(settings) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=upstream.base_url
        )
        request = chat_request("", llm_config=config)
        stream = gw.chat.StreamCreate(chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()))
        events = [event async for event in stream]
    content = "".join(e.delta.content for e in events[:-1])
    assert content == "x [REDACTED] y"
    assert events[-1].completion.choices[0].message.content == "x [REDACTED] y"


@pytest.mark.parametrize("where", ["choice", "tool_call"])
async def test_a_key_echoed_as_an_index_is_a_bad_response_and_not_in_spans(
    tmp_path: Path, upstream: ScriptedEcho, where: str
) -> None:
    # `int(index)` raised a bare ValueError quoting the value: INTERNAL for the caller, and the
    # key in the exception the span recorded (exception.message, exception.stacktrace).
    import grpc
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server.app import GatewayServer

    key = "byok-" + secrets.token_hex(24)  # no known key shape: only the known value can catch it
    upstream.unary = lambda got: {
        "id": "c",
        "model": "m",
        "choices": [
            {"index": got, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    if where == "choice":
        upstream.script = lambda got: [{"content": "hi", "choice_index": got}, {"finish_reason": "stop"}]
    else:
        upstream.script = lambda got: [
            {"tool_calls": [{"index": got, "id": "c0", "function": {"name": "f", "arguments": "{}"}}]},
            {"finish_reason": "tool_calls"},
        ]
    exporter = InMemorySpanExporter()
    settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=upstream.base_url)
    async with running_gateway(settings, server=GatewayServer(settings, span_exporter=exporter)) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=upstream.base_url
        )
        request = chat_request("", llm_config=config, functions=[SEND])
        stream = gw.chat.StreamCreate(chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await gw.chat.Create(request, timeout=20)
    for error in (caught.value, unary.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert key not in str(error.details()) + str(error.trailing_metadata())
    spans = exporter.get_finished_spans()
    texts = [str(dict(span.attributes or {})) for span in spans]
    texts += [str(dict(event.attributes or {})) for span in spans for event in span.events]
    assert not [text for text in texts if key in text]
