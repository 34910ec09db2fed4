"""Issue 12 item 10, local servers: an output cut by the token limit is an answer, not a failure.

Every server type says "stopped at the limit" its own way (tests/local_fakes.py `Answer.cut`).
A cut function call is returned as the model wrote it, with FINISH_REASON_LENGTH, instead of
UNPARSEABLE_MODEL_OUTPUT (which clients retry, paying again for the same cut); and the
lenient parser does not "repair" a cut call into a complete-looking one with truncated values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_local_servers import local_request
from tests.local_fakes import KINDS, SEND_MESSAGE_OUTPUT, Answer, LocalServer

CUT_OUTPUT = '{"function": "send_message", "params": {"thinking": "The user greets me.", "message": "Hi th'


@pytest.fixture(params=KINDS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[LocalServer]:
    fake = LocalServer(request.param)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
    assert not fake.violations, fake.violations


@pytest.fixture
async def gw(tmp_path: Path, server: LocalServer) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
    async with running_gateway(settings) as running:
        yield running


async def _final(gw: RunningGateway, rpc: str, request: chat_pb2.CreateRequest) -> chat_pb2.ChatCompletion:
    if rpc == "Create":
        return (await gw.chat.Create(request, timeout=20)).completion
    events = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
    assert events[-1].WhichOneof("event") == "completion"
    return events[-1].completion


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_a_cut_call_is_returned_as_written_with_length(
    gw: RunningGateway, server: LocalServer, rpc: str
) -> None:
    server.script(Answer(text=CUT_OUTPUT, cut=True))
    completion = await _final(gw, rpc, local_request(server))
    [choice] = completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert not choice.message.tool_calls  # no call was completed: none is made up
    assert choice.message.content == CUT_OUTPUT
    assert len(server.requests) == 1


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_a_complete_call_with_cut_chatter_after_it_is_still_a_call(
    gw: RunningGateway, server: LocalServer, rpc: str
) -> None:
    server.script(Answer(text=SEND_MESSAGE_OUTPUT + "\nI hope this helps, and if you need any", cut=True))
    completion = await _final(gw, rpc, local_request(server))
    [choice] = completion.choices
    [call] = choice.message.tool_calls
    assert call.name == "send_message"
    assert choice.message.content == "The user greets me."


async def test_unparseable_output_without_a_cut_is_still_unparseable(
    gw: RunningGateway, server: LocalServer
) -> None:
    server.script(Answer(text="I would rather chat than call a function."))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.chat.Create(local_request(server), timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "UNPARSEABLE_MODEL_OUTPUT" in repr(info.value.trailing_metadata())


async def test_cut_plain_text_says_length_not_stop(gw: RunningGateway, server: LocalServer) -> None:
    server.script(Answer(text="Once upon a time there was a", cut=True))
    completion = await _final(gw, "Create", local_request(server, functions=[]))
    [choice] = completion.choices
    assert choice.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert choice.message.content == "Once upon a time there was a"
