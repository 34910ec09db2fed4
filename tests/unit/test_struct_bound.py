"""struct_bound's shadow decode on encodings a protobuf encoder never makes but a caller can send."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

from server.api.struct_bound import MAX_STRUCT_BYTES, _shadow_class, oversized_structs
from tests.integration.test_struct_bound import _field, function_bytes
from tests.integration.test_struct_bound_review import pieces

# ~700 KB each, distinct keys: the two merged are over the bound, one is not.
PIECE, OTHER = pieces(120_000, 60_000)
assert MAX_STRUCT_BYTES // 2 < len(PIECE) < MAX_STRUCT_BYTES


def fields(descriptor: object) -> list[str]:
    return [f.name for f in descriptor.fields]  # type: ignore[attr-defined]


def test_a_function_schema_in_pieces_is_measured_merged() -> None:
    # The real decode merges the occurrences of FunctionDefinition.parameters into one map.
    data = _field(3, _field(1, b"f") + _field(3, PIECE) + _field(3, OTHER))
    merged = chat_pb2.CreateRequest.FromString(data).functions[0].parameters
    assert merged.ByteSize() > MAX_STRUCT_BYTES
    violations = oversized_structs(chat_pb2.CreateRequest, data)
    assert [v.field for v in violations] == ["functions[0].parameters"]


def test_a_response_schema_in_pieces_of_llm_config_is_measured_merged() -> None:
    def config(piece: bytes) -> bytes:
        return _field(1, _field(19, _field(2, _field(3, piece))))

    for message_type in (chat_pb2.CreateRequest, chat_pb2.StreamCreateRequest, chat_pb2.CountTokensRequest):
        violations = oversized_structs(message_type, config(PIECE) + config(OTHER))
        assert [v.field for v in violations] == ["llm_config.response_format.json_schema.schema"]
    fallback = _field(14, _field(19, _field(2, _field(3, PIECE) + _field(3, OTHER))))
    violations = oversized_structs(chat_pb2.CreateRequest, fallback)
    assert [v.field for v in violations] == ["fallbacks[0].response_format.json_schema.schema"]


def test_pieces_in_separate_functions_are_not_added_up() -> None:
    # Repeated fields are not merged: two functions of one piece each are two small maps.
    data = function_bytes("a", PIECE) + function_bytes("b", OTHER)
    assert oversized_structs(chat_pb2.CreateRequest, data) == []


@pytest.mark.parametrize(
    "tail", [b"\xff", b"\x0b", _field(3, b"\x1a\xff\xff")], ids=["truncated-tag", "open-group", "bad-length"]
)
def test_bytes_that_do_not_decode_raise_before_the_real_decode(tail: bytes) -> None:
    # The real decode would fill the schema's map before reaching the bad bytes at the end.
    data = function_bytes("f", PIECE) + _field(3, _field(1, b"g")) * 100_000 + tail
    assert len(data) > MAX_STRUCT_BYTES
    with pytest.raises(DecodeError):
        chat_pb2.CreateRequest.FromString(data)
    with pytest.raises(DecodeError):
        oversized_structs(chat_pb2.CreateRequest, data)


def test_the_shadow_holds_only_the_fields_on_the_way_to_a_struct() -> None:
    # Decoding 64 MB of small messages twice took seconds; left out, they are skipped over.
    shadow = _shadow_class(chat_pb2.CreateRequest.DESCRIPTOR)
    assert fields(shadow.DESCRIPTOR) == ["llm_config", "functions", "fallbacks"]
    assert fields(shadow.DESCRIPTOR.fields_by_name["llm_config"].message_type) == ["response_format"]
    function = shadow.DESCRIPTOR.fields_by_name["functions"].message_type
    assert fields(function) == ["parameters"]
    assert fields(function.fields_by_name["parameters"].message_type) == []  # a Blob


def test_types_without_a_struct_are_never_shadowed() -> None:
    big = b"\x12" + b"\x80\x80\x40" + b"x" * (1 << 20)  # any bytes over the bound
    for message_type in (traces_pb2.ListProviderTracesRequest, providers_pb2.CreateProviderRequest):
        assert oversized_structs(message_type, big) == []
