"""The request path's shortcuts give the answers of the full checks they skip (issue 20)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2, traces_pb2

from server.api.context import parse
from server.core import validation
from server.errors import InvalidRequest


def _trace_fields(request: chat_pb2.CreateRequest) -> list[str]:
    return [v.field for v in validation._trace_violations(request)]


@pytest.mark.parametrize(
    ("trace", "user_id", "fields"),
    [
        (chat_pb2.TraceContext(step_id="s" * 256), "", []),
        (chat_pb2.TraceContext(step_id="s" * 257), "", ["trace.step_id"]),
        # Multi-byte: 200 characters in 400 bytes are within the bound (the byte fast path
        # does not decide it; the full check does), 257 characters are not.
        (chat_pb2.TraceContext(agent_id="é" * 200, run_id="ü" * 200), "", []),
        (chat_pb2.TraceContext(run_id="é" * 257), "", ["trace.run_id"]),
        (chat_pb2.TraceContext(tags=["t"] * 256), "", []),
        (chat_pb2.TraceContext(tags=["t"] * 257), "", ["trace.tags"]),
        (chat_pb2.TraceContext(tags=["ok", "t" * 257]), "", ["trace.tags[1]"]),
        (chat_pb2.TraceContext(step_id="s" * 40, call_type="c" * 40), "u" * 256, []),
        (chat_pb2.TraceContext(step_id="s" * 40), "u" * 257, ["user_id"]),
        (chat_pb2.TraceContext(), "", []),
    ],
)
def test_trace_bounds_with_and_without_the_byte_shortcut(
    trace: chat_pb2.TraceContext, user_id: str, fields: list[str]
) -> None:
    request = chat_pb2.CreateRequest(trace=trace, user_id=user_id)
    assert _trace_fields(request) == fields


def _functions(count: int, properties: int) -> list[chat_pb2.FunctionDefinition]:
    out = []
    for f in range(count):
        parameters = struct_pb2.Struct()
        parameters.update(
            {
                "type": "object",
                "properties": {
                    f"p{p}": {"type": "string", "description": "x" * 40} for p in range(properties)
                },
            }
        )
        out.append(chat_pb2.FunctionDefinition(name=f"f{f}", description="d" * 50, parameters=parameters))
    return out


def test_a_normal_function_set_is_keyed_whole_without_awaiting() -> None:
    functions = _functions(20, 5)
    assert validation.function_keys_started(functions) == list(validation.function_keys(functions))
    assert validation.function_keys_started([]) == []


async def test_a_huge_function_set_is_serialized_once_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    functions = _functions(300, 10)
    keys = validation.function_keys(functions)
    assert validation.off_loop(keys)
    on_loop: list[int] = []
    loop_thread = threading.get_ident()
    original = validation._serialized

    def spy(function: Any) -> bytes:
        if threading.get_ident() == loop_thread:
            on_loop.append(1)
        return original(function)

    monkeypatch.setattr(validation, "_serialized", spy)
    started = validation.function_keys_started(functions)
    assert 0 < len(started) < len(functions)
    assert await validation.function_keys_rest(functions, started) == keys
    assert len(on_loop) == len(started)  # the rest went to the pool, nothing twice


def test_parse_without_timestamps_decodes_and_with_them_still_checks() -> None:
    request = chat_pb2.CreateRequest(llm_config=chat_pb2.LLMConfig(model="m"))
    assert parse(chat_pb2.CreateRequest, request.SerializeToString()) == request
    bad = traces_pb2.ListProviderTracesRequest()
    bad.start_time.seconds = -62_135_596_801  # before year 1
    with pytest.raises(InvalidRequest, match="start_time"):
        parse(traces_pb2.ListProviderTracesRequest, bad.SerializeToString())
    good = traces_pb2.ListProviderTracesRequest()
    good.start_time.seconds = 1_700_000_000
    assert parse(traces_pb2.ListProviderTracesRequest, good.SerializeToString()) == good
