"""A streamed tool-call fragment's `thought_signature` that is not a string is dropped, as the
unary answer drops it (`completion._signature`: only Gemini's translator sets one, an
OpenAI-compatible upstream's own value may be anything). The stream's accumulator counted it
against the answer cap as text: AttributeError, INTERNAL."""

from __future__ import annotations

from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, usage_chunk
from tests.gateway_harness import RunningGateway, chat_request


@pytest.mark.parametrize("signature", [True, 1, 2.5, ["s"], {"s": 1}])
async def test_a_streamed_signature_of_another_type_is_dropped(
    gateway: RunningGateway, upstream: FakeUpstream, signature: Any
) -> None:
    fragment = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "search", "arguments": "{}"},
        "thought_signature": signature,
    }
    events: list[dict[str, Any] | str] = [
        chunk({"role": "assistant", "tool_calls": [fragment]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(),
        "[DONE]",
    ]
    upstream.script(Reply(sse=events))
    request = chat_request(upstream.base_url)
    streamed = [e async for e in gateway.chat.StreamCreate(request, timeout=30)]
    last = streamed[-1]
    assert last.WhichOneof("event") == "completion"
    (call,) = last.completion.choices[0].message.tool_calls
    assert (call.name, call.thought_signature) == ("search", "")
    assert last.completion.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS


async def test_a_streamed_signature_that_is_a_string_is_kept(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    fragment = {
        "index": 0,
        "id": "call_1",
        "function": {"name": "search", "arguments": "{}"},
        "thought_signature": "sig",
    }
    events: list[dict[str, Any] | str] = [
        chunk({"role": "assistant", "tool_calls": [fragment]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(),
        "[DONE]",
    ]
    upstream.script(Reply(sse=events))
    streamed = [e async for e in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30)]
    (call,) = streamed[-1].completion.choices[0].message.tool_calls
    assert call.thought_signature == "sig"
