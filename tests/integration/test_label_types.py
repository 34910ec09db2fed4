"""An answer's id, model or system_fingerprint of another type than a string: written as its
str(), and so held to MAX_LABEL_CHARS as that string (UNAVAILABLE / UPSTREAM_BAD_RESPONSE past
it). Only strings were measured: a list of numbers as the id went out as an id of megabytes,
counted by neither the label bound nor the answer cap; unary and streamed alike."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from server.core.completion import MAX_LABEL_CHARS
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_errors_support import expect

LONG: list[Any] = [[7] * MAX_LABEL_CHARS, {"k": "v" * MAX_LABEL_CHARS}]


@pytest.mark.parametrize("key", ["id", "model", "system_fingerprint"])
@pytest.mark.parametrize("label", LONG)
async def test_a_unary_label_of_another_type_is_bounded_as_its_string(
    gateway: RunningGateway, upstream: FakeUpstream, key: str, label: Any
) -> None:
    body = completion("hi")
    body[key] = label
    upstream.script(Reply(json_body=body))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == key


@pytest.mark.parametrize("key", ["id", "model", "system_fingerprint"])
async def test_a_streamed_label_of_another_type_is_bounded_as_its_string(
    gateway: RunningGateway, upstream: FakeUpstream, key: str
) -> None:
    events = text_stream(["Hel", "lo"])
    for event in events:
        if isinstance(event, dict):
            event[key] = [7] * MAX_LABEL_CHARS
    upstream.script(Reply(sse=events))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in gateway.chat.StreamCreate(chat_request(upstream.base_url), timeout=30):
            pass
    d = expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert d.error_infos[0].metadata["field"] == key


async def test_a_short_label_of_another_type_is_its_string(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    body = completion("hi")
    body["id"], body["system_fingerprint"] = 12345, [1, 2]
    upstream.script(Reply(json_body=body))
    answer = await gateway.chat.Create(chat_request(upstream.base_url), timeout=30)
    assert (answer.completion.id, answer.completion.system_fingerprint) == ("12345", "[1, 2]")
