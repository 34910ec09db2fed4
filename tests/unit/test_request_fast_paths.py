"""The request path's shortcuts give the answers of the full checks they skip (issue 20)."""

from __future__ import annotations

import pytest
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
