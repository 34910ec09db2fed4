"""A thinking block's `type` that is not a string is dropped, as the block's other fields of
other types are: it was written as its str(), text the answer cap never counts (it counts a
block's string values), so a list there went out past LLMGW_MAX_ANSWER_BYTES."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway

CAP = 64 * 1024


@pytest.fixture
async def capped(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), max_answer_bytes=CAP)
    async with running_gateway(settings) as running:
        yield running


async def test_a_thinking_block_type_that_is_not_a_string_is_not_carried(
    capped: RunningGateway, upstream: FakeUpstream
) -> None:
    body = completion("x" * (CAP // 2))
    # 40 KB of body; as its str() ("[7, 7, ...") 60 KB, the answer past the cap uncounted.
    body["choices"][0]["message"]["thinking_blocks"] = [{"type": [7] * 20_000, "thinking": "t"}]
    upstream.script(Reply(json_body=body))
    try:
        answer = await capped.chat.Create(chat_request(upstream.base_url), timeout=30)
    except grpc.aio.AioRpcError as err:  # refusing it would do as well
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        return
    (block,) = answer.completion.choices[0].message.thinking_blocks
    assert (block.type, block.text) == ("", "t")
    assert answer.completion.ByteSize() < CAP + 4096


async def test_a_thinking_block_type_that_is_a_string_is_kept(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    body = completion("hi")
    body["choices"][0]["message"]["thinking_blocks"] = [{"type": "redacted_thinking", "data": "d"}]
    upstream.script(Reply(json_body=body))
    answer = await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    (block,) = answer.completion.choices[0].message.thinking_blocks
    assert (block.type, block.data) == ("redacted_thinking", "d")
