"""Final review of the merged issue-12 fixes: defects between two fixes that each passed alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llmgateway.v1 import chat_pb2

from tests.gateway_harness import RunningGateway, make_settings, running_gateway
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
