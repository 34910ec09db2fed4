"""The head of Create and StreamCreate (function keys, validation): plain calls on the loop for a
normal tool set, the offload pool for a huge one, and the same answers either way."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server import gateway as gateway_module
from server.core.validation import function_keys, off_loop
from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import RunningGateway, chat_request


def _functions(count: int, properties: int) -> list[chat_pb2.FunctionDefinition]:
    functions = []
    for i in range(count):
        parameters = struct_pb2.Struct()
        parameters.update(
            {
                "type": "object",
                "properties": {
                    f"p{j}": {"type": "string", "description": "d" * 100} for j in range(properties)
                },
                "required": ["p0"],
            }
        )
        functions.append(chat_pb2.FunctionDefinition(name=f"f{i}", description="x", parameters=parameters))
    return functions


def _record_validation(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each validate_request of the gateway ran on the loop's thread."""
    on_loop: list[bool] = []
    loop_thread = threading.get_ident()
    real = gateway_module.validate_request

    def recording(*args: Any, **kwargs: Any) -> None:
        on_loop.append(threading.get_ident() == loop_thread)
        real(*args, **kwargs)

    monkeypatch.setattr(gateway_module, "validate_request", recording)
    return on_loop


@pytest.mark.parametrize(("count", "huge"), [(2, False), (120, True)])
async def test_a_stream_validates_a_normal_tool_set_on_the_loop_and_a_huge_one_in_the_pool(
    upstream: FakeUpstream, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, count: int, huge: bool
) -> None:
    functions = _functions(count, 24)
    assert off_loop(function_keys(functions)) is huge
    on_loop = _record_validation(monkeypatch)
    upstream.script(Reply(sse=text_stream(["Hello", " there"])))
    request = chat_request(upstream.base_url, context_window=0, functions=functions)
    request.function_call = "auto"
    events = [e async for e in gateway.chat.StreamCreate(request, timeout=30)]
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == "Hello there"
    assert events[-1].completion.choices[0].message.content == "Hello there"
    assert on_loop == [not huge]


@pytest.mark.parametrize("count", [2, 120])
async def test_a_stream_refuses_an_invalid_request_the_same_whether_validated_on_the_loop_or_not(
    upstream: FakeUpstream, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    on_loop = _record_validation(monkeypatch)
    request = chat_request(upstream.base_url, functions=_functions(count, 24))
    request.functions[0].name = "not a valid name"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [e async for e in gateway.chat.StreamCreate(request, timeout=30)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "functions[0].name" in (caught.value.details() or "")
    assert on_loop == [count == 2]
    assert upstream.requests == []  # nothing left the gateway
