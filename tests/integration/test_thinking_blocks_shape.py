"""`thinking_blocks` from an OpenAI-compatible upstream that is not a list: UNAVAILABLE /
UPSTREAM_BAD_RESPONSE, as any value of the wrong type, never a crash. A number there reached
`for block in ...` unchecked (answer_bytes, completion_from_json, the stream's accumulator):
TypeError, INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_errors_support import expect

NOT_LISTS: list[Any] = [5, True, 1.5, "blocks", {"type": "thinking", "thinking": "t"}]


@pytest.mark.parametrize("blocks", NOT_LISTS)
async def test_a_unary_answers_thinking_blocks_that_are_not_a_list(
    gateway: RunningGateway, upstream: FakeUpstream, blocks: Any
) -> None:
    body = completion("hi")
    body["choices"][0]["message"]["thinking_blocks"] = blocks
    upstream.script(Reply(json_body=body))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == "choices[0].message.thinking_blocks"


@pytest.mark.parametrize("blocks", NOT_LISTS)
async def test_a_streamed_deltas_thinking_blocks_that_are_not_a_list(
    gateway: RunningGateway, upstream: FakeUpstream, blocks: Any
) -> None:
    events = text_stream(["Hel", "lo"])
    events.insert(2, chunk({"thinking_blocks": blocks}))
    upstream.script(Reply(sse=events))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30):
            pass
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == "choices[0].delta.thinking_blocks"


async def test_a_list_of_blocks_still_passes(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    body = completion("hi")
    body["choices"][0]["message"]["thinking_blocks"] = [
        {"type": "thinking", "thinking": "t", "signature": "s"},
        "not a block",  # skipped, as before
    ]
    upstream.script(Reply(json_body=body))
    answer = await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    blocks = answer.completion.choices[0].message.thinking_blocks
    assert [(b.type, b.text, b.signature) for b in blocks] == [("thinking", "t", "s")]
