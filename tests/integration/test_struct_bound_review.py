"""The Struct bound against encodings a protobuf encoder never makes but a caller can send.

A singular message field sent several times is merged by the decoder: a schema sent as many
pieces, each under the bound, is one huge map in the real decode; and bytes that end in garbage
are decoded up to the garbage, a huge map included, before the decode fails. Each of these held
the worker as long as the one huge schema the bound was made for.
"""

from __future__ import annotations

import time

import grpc
import pytest

from server.api.struct_bound import MAX_STRUCT_BYTES
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway
from tests.integration.test_errors_support import CHAT, assert_serving, call_raw, expect
from tests.integration.test_struct_bound import _field, function_bytes, request_bytes

INVALID = grpc.StatusCode.INVALID_ARGUMENT
KEYS = 1_500_000  # the map that held the worker for seconds, as pieces of 60,000 keys
PIECE = 60_000


def pieces(keys: int = KEYS, piece: int = PIECE) -> list[bytes]:
    """A Struct of `keys` distinct null keys as pieces of `piece` keys, each under the bound."""
    null = _field(2, b"\x08\x00")
    out = [
        b"".join(_field(1, _field(1, b"%x" % i) + null) for i in range(start, min(start + piece, keys)))
        for start in range(0, keys, piece)
    ]
    assert max(map(len, out)) < MAX_STRUCT_BYTES
    return out


async def refused_quickly(gateway: RunningGateway, data: bytes, rpc: str = "Create") -> grpc.aio.AioRpcError:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_raw(gateway.channel, f"{CHAT}{rpc}", data, timeout=120)
    waited = time.monotonic() - started
    assert waited < 5, f"the call took {waited:.1f} s"
    await assert_serving(gateway.channel)
    return info.value


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate", "CountTokens"])
async def test_a_function_schema_sent_in_pieces_is_bounded_as_one(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    # FunctionDefinition.parameters (3) sent 25 times: the decoder merges them into one map.
    parameters = b"".join(_field(3, piece) for piece in pieces())
    function = _field(3, _field(1, b"huge") + parameters)
    err = await refused_quickly(gateway, request_bytes(upstream.base_url, function), rpc)
    d = expect(err, INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"functions[0].parameters"}, d.violations
    assert not upstream.requests


async def test_a_response_schema_sent_in_pieces_of_llm_config_is_bounded_as_one(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # llm_config (1) sent once per piece, each with response_format.json_schema.schema: the
    # configs merge, and their schemas with them.
    config = b"".join(_field(1, _field(19, _field(2, _field(3, piece)))) for piece in pieces())
    err = await refused_quickly(gateway, request_bytes(upstream.base_url) + config)
    d = expect(err, INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"llm_config.response_format.json_schema.schema"}, d.violations


async def test_undecodable_bytes_after_a_huge_schema_are_refused_without_decoding_it(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # The same answer as ever for bytes that do not decode (a truncated tag at the end),
    # without filling the map first.
    huge = b"".join(pieces())
    data = request_bytes(upstream.base_url, function_bytes("huge", huge)) + b"\xff"
    d = expect(await refused_quickly(gateway, data), INVALID, "INVALID_REQUEST")
    assert d.violations == {"": "the request bytes do not decode as llmgateway.v1.CreateRequest"}
    assert d.metadata["message_type"] == "llmgateway.v1.CreateRequest"
    assert not upstream.requests


async def test_schemas_in_pieces_under_the_bound_in_all_are_decoded_as_before(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # A schema of 4 pieces, 800 KB in all, in a 1.3 MB request: merged and counted as one.
    parameters = b"".join(_field(3, piece) for piece in pieces(64_000, 16_000))
    data = request_bytes(
        upstream.base_url,
        _field(3, _field(1, b"merged") + parameters),
        function_bytes("pad", b"".join(pieces(40_000))),
    )
    assert len(data) > MAX_STRUCT_BYTES
    answers = await call_raw(gateway.channel, f"{CHAT}CountTokens", data, timeout=60)
    assert answers


async def test_a_huge_schema_with_a_bad_string_elsewhere_is_refused_quickly(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # user_id not UTF-8: the real decode fails at the end, after the map. The shadow does not
    # decode user_id (only the fields on the way to a Struct), so the schema is what it names;
    # bad bytes inside a schema were named that way already: both are INVALID_REQUEST.
    huge = b"".join(pieces())
    data = request_bytes(upstream.base_url, function_bytes("huge", huge)) + _field(9, b"\xff\xfe")
    d = expect(await refused_quickly(gateway, data), INVALID, "INVALID_REQUEST")
    assert set(d.violations) == {"functions[0].parameters"}, d.violations
    assert not upstream.requests
