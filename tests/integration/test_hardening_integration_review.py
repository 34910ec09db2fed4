"""Final review of the merged issue-12 fixes: defects between two fixes that each passed alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_local_servers import local_request
from tests.local_fakes import Answer, LocalServer


@pytest.fixture
async def ollama() -> AsyncIterator[LocalServer]:
    server = LocalServer("ollama")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def gw(tmp_path: Path, ollama: LocalServer) -> AsyncIterator[RunningGateway]:
    async with running_gateway(make_settings(tmp_path, allowed_endpoints=(ollama.root_url,))) as running:
        yield running


# -- final_completion_without_deltas x the local path's strip() -----------------------------------


async def test_local_stream_leaves_out_a_plain_answer_the_deltas_carried_even_with_whitespace(
    gw: RunningGateway, ollama: LocalServer
) -> None:
    # A local model's text usually starts with a space or ends with a newline; the local path
    # strips the plain answer, and the whole text then went out again in the final completion
    # (past 4 MiB a default client refuses it: the very case the option is for).
    text = " Hello there, how are you?\n"
    ollama.script(Answer(text=text))
    request = local_request(ollama, functions=[], final_completion_without_deltas=True)
    events = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
    assert "".join(e.delta.content for e in events[:-1]) == text
    final = events[-1].completion
    assert final.choices[0].message.content == ""
    assert final.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP


# -- huge tool sets x the stream's own usage count --------------------------------------------------


def _huge_functions() -> list[chat_pb2.FunctionDefinition]:
    """Well over OFFLOAD_FUNCTION_BYTES (and MAX_CACHED_LIST_BYTES: prepared on every request)."""
    from google.protobuf import struct_pb2

    functions = []
    for i in range(120):
        parameters = struct_pb2.Struct()
        parameters.update(
            {
                "type": "object",
                "properties": {f"p{j}": {"type": "string", "description": "d" * 100} for j in range(24)},
                "required": ["p0"],
            }
        )
        functions.append(chat_pb2.FunctionDefinition(name=f"f{i}", description="x", parameters=parameters))
    return functions


async def test_a_huge_tool_set_is_prepared_off_the_loop_for_the_usage_of_a_stream_without_usage(
    upstream: FakeUpstream, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No context window (the guard counted nothing) and no usage chunk: the stream counts the
    # prompt for its usage. The README says a tool set over 64 KiB is converted off the loop;
    # this count prepared the function dicts again on the event loop.
    import threading

    from server import gateway as gateway_module
    from server.core.validation import OFFLOAD_FUNCTION_BYTES, function_keys, off_loop

    functions = _huge_functions()
    keys = function_keys(functions)
    assert off_loop(keys) and sum(map(len, keys)) > 4 * OFFLOAD_FUNCTION_BYTES
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real = gateway_module.prompt_functions

    def recording(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == loop_thread:
            on_loop.append("prompt_functions")
        return real(*args, **kwargs)

    monkeypatch.setattr(gateway_module, "prompt_functions", recording)
    upstream.script(Reply(sse=text_stream(["Hello", " there"], usage=False)))
    request = chat_request(upstream.base_url, context_window=0, functions=functions)
    request.function_call = "auto"  # the text answer is then an answer (under "required" it is not)
    events = [e async for e in gateway.chat.StreamCreate(request, timeout=30)]
    usage = events[-1].completion.usage
    assert usage.prompt_tokens > 1000 and usage.completion_tokens > 0
    assert on_loop == []
