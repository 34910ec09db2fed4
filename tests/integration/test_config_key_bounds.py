"""The config key shared by the caches (validation's, the body's, the trace's copy): a config of
exactly the cacheable size is kept by all three and one byte more by none (unknown fields count:
they are in the bytes), and a refused config is refused alike whether the request's function set
sends its validation to the offload pool or keeps it on the loop."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2

from server.core import openai_request, validation
from server.core.config_cache import MAX_CACHED_CONFIG_BYTES
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_config_key import _queued
from tests.integration.test_errors_support import details
from tests.integration.test_request_head import _functions

UNKNOWN_TAG = b"\xfa\x06"  # field 111, length-delimited: no field of LLMConfig


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _sized(base_url: str, size: int) -> chat_pb2.LLMConfig:
    """A valid config that serializes to exactly `size` bytes, padded by an unknown field."""
    config = chat_pb2.LLMConfig(
        model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=base_url, temperature=0.5
    )
    known = config.SerializeToString()
    for payload in range(size - len(known) - len(UNKNOWN_TAG), -1, -1):
        raw = known + UNKNOWN_TAG + _varint(payload) + b"u" * payload
        if len(raw) == size:
            sized = chat_pb2.LLMConfig.FromString(raw)
            assert sized.SerializeToString() == raw
            return sized
    raise AssertionError(f"no padding makes {size} bytes")


def _kept(gw: RunningGateway, key: bytes, endpoint: str) -> list[bool]:
    assert gw.server.gateway is not None
    return [
        key in validation._CONFIG_CHECKS,
        (key, endpoint) in openai_request._CONFIG_BODIES,
        key in gw.server.gateway._config_json_cache,
    ]


LIMIT = MAX_CACHED_CONFIG_BYTES


@pytest.mark.parametrize(("size", "kept"), [(LIMIT, True), (LIMIT + 1, False)])
async def test_a_config_of_the_cacheable_size_is_kept_by_every_cache_and_one_byte_more_by_none(
    upstream: FakeUpstream, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, size: int, kept: bool
) -> None:
    assert LIMIT == validation.MAX_CACHED_CONFIG_BYTES == openai_request.MAX_CACHED_CONFIG_BYTES
    records = _queued(monkeypatch)
    config = _sized(upstream.base_url, size)
    key = config.SerializeToString()
    assert len(key) == size
    for _ in range(2):  # the second call is served by the caches when kept: the same answer
        upstream.script(Reply(json_body=completion("hello")))
        response = await gateway.chat.Create(chat_request(upstream.base_url, llm_config=config), timeout=10)
        assert response.completion.choices[0].message.content == "hello"
        sent = upstream.requests[-1].body
        assert (sent["model"], sent["temperature"]) == ("gpt-4o-mini", 0.5)
        assert not any("u" * 100 in str(value) for value in sent.values())  # the unknown field
        # The trace's copy is the config as JSON: its known fields, never the unknown one.
        assert json.loads(records[-1].llm_config_json) == json.loads(json_format.MessageToJson(config))
        assert _kept(gateway, key, upstream.base_url) == [kept] * 3


BAD_CONFIGS: dict[str, Any] = {
    "temperature": lambda url: chat_pb2.LLMConfig(
        model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=url, temperature=5.0
    ),
    "over_a_mib": lambda url: _sized(url, validation.MAX_CONFIG_BYTES + 1),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", list(BAD_CONFIGS))
async def test_a_bad_config_is_refused_alike_on_the_loop_and_in_the_pool(
    upstream: FakeUpstream, gateway: RunningGateway, stream: bool, bad: str
) -> None:
    refusals = []
    for count in (2, 120):  # validated on the loop, then in the offload pool
        functions = _functions(count, 24)
        assert validation.off_loop(validation.function_keys(functions)) is (count == 120)
        request = chat_request(upstream.base_url, llm_config=BAD_CONFIGS[bad](upstream.base_url))
        request.functions.extend(functions)
        upstream.script(Reply(sse=text_stream(["no"])) if stream else Reply(json_body=completion("no")))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if stream:
                _ = [e async for e in gateway.chat.StreamCreate(request, timeout=30)]
            else:
                await gateway.chat.Create(request, timeout=30)
        found = details(caught.value)
        refusals.append((found.code, found.reason, found.message, found.violations))
    assert refusals[0] == refusals[1]
    assert refusals[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert list(refusals[0][3]) == ["llm_config" if bad == "over_a_mib" else "llm_config.temperature"]
    assert upstream.requests == []  # nothing left the gateway
