"""A JSON object (google.protobuf.Struct) over 1 MiB encoded is refused before the request is
decoded: protobuf's decoder fills one big map in superlinear time holding the GIL (1,500,000
keys, 33 MB: ~16 s), which froze the worker for every other call."""

from __future__ import annotations

import time

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from server.api.struct_bound import MAX_STRUCT_BYTES
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_errors_support import CHAT, assert_serving, call_raw, expect

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def struct_bytes(keys: int) -> bytes:
    """A Struct of `keys` keys, each null, encoded directly (building it as a message is slower)."""
    null = _field(2, b"\x08\x00")  # value: Value{null_value: NULL_VALUE}
    return b"".join(_field(1, _field(1, b"%x" % i) + null) for i in range(keys))


def function_bytes(name: str, parameters: bytes) -> bytes:
    return _field(3, _field(1, name.encode()) + _field(3, parameters))  # CreateRequest.functions


def request_bytes(base_url: str, *functions: bytes, config: chat_pb2.LLMConfig | None = None) -> bytes:
    request = chat_request(base_url)
    if config is not None:
        request.llm_config.CopyFrom(config)
    return request.SerializeToString() + b"".join(functions)


def keys_for(size: int) -> int:
    """About how many keys `struct_bytes` encodes in `size` bytes (entries of 9-12 bytes)."""
    return size // 12


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate", "CountTokens"])
async def test_a_function_schema_over_the_bound_is_refused_naming_it(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    big = struct_bytes(keys_for(MAX_STRUCT_BYTES) + 20_000)
    assert len(big) > MAX_STRUCT_BYTES
    small = struct_bytes(3)
    data = request_bytes(upstream.base_url, function_bytes("ok", small), function_bytes("huge", big))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, f"{CHAT}{rpc}", data)
    d = expect(info.value, INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"functions[1].parameters"}, d.violations
    assert "1,048,576 bytes" in d.violations["functions[1].parameters"]
    assert d.metadata["fields"] == "functions[1].parameters"
    assert not upstream.requests
    await assert_serving(gateway.channel)


async def test_a_response_schema_over_the_bound_is_refused_naming_it(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    config = chat_request(upstream.base_url).llm_config
    schema = config.response_format.json_schema
    schema.name = "answer"
    # Built as a message: the config's own path (response_format.json_schema.schema).
    for i in range(keys_for(MAX_STRUCT_BYTES) + 20_000):
        schema.schema.fields[f"{i:x}"].null_value = 0
    assert schema.schema.ByteSize() > MAX_STRUCT_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, f"{CHAT}Create", request_bytes(upstream.base_url, config=config))
    d = expect(info.value, INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"llm_config.response_format.json_schema.schema"}, d.violations


async def test_big_requests_of_small_schemas_are_decoded_as_before(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # 3 MB in all, no one schema over the bound (one just under it): the shadow decode finds
    # nothing and the request goes on to validation and upstream as it always did.
    under = struct_bytes(keys_for(MAX_STRUCT_BYTES) - 5_000)
    assert MAX_STRUCT_BYTES - 100_000 < len(under) <= MAX_STRUCT_BYTES
    schemas = [function_bytes("near", under)] + [
        function_bytes(f"f{i}", struct_bytes(2_000)) for i in range(100)
    ]
    data = request_bytes(upstream.base_url, *schemas)
    assert len(data) > 2 * MAX_STRUCT_BYTES
    answers = await call_raw(gateway.channel, f"{CHAT}CountTokens", data, timeout=60)
    counted = chat_pb2.CountTokensResponse.FromString(answers[0])
    assert counted.function_tokens > 0


async def test_one_huge_schema_no_longer_freezes_the_worker(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # 1,500,000 keys (~16 MB): the old decode held the loop for seconds (superlinear in the
    # map's size), every other call of the worker with it; refused from its encoded size.
    data = request_bytes(upstream.base_url, function_bytes("huge", struct_bytes(1_500_000)))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, f"{CHAT}Create", data, timeout=120)
    waited = time.monotonic() - started
    d = expect(info.value, INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"functions[0].parameters"}, d.violations
    assert waited < 5, f"the call took {waited:.1f} s"
    await assert_serving(gateway.channel)
