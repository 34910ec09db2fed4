"""Issue 12, the answer path's amplification on local servers: what one network read brought is
relayed as one delta (as on the OpenAI-compatible path), not one gRPC message per token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import expect

PIECES = [f"t{n} " for n in range(1000)]


@pytest.fixture
async def gw(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    root = f"http://127.0.0.1:{upstream.port}"
    async with running_gateway(make_settings(tmp_path, allowed_endpoints=(root,))) as running:
        yield running


def _request(kind: str, endpoint: str) -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(
        model="llama3.1:8b", model_endpoint_type=kind, model_endpoint=endpoint, context_window=8192
    )
    return chat_pb2.CreateRequest(
        llm_config=config, messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")]
    )


async def _events(gw: RunningGateway, request: chat_pb2.CreateRequest) -> list[chat_pb2.StreamCreateResponse]:
    return [event async for event in gw.chat.StreamCreate(request, timeout=30)]


def _ndjson(pieces: list[str]) -> bytes:
    lines = [{"response": p, "done": False} for p in pieces]
    lines.append({"response": "", "done": True, "prompt_eval_count": 5, "eval_count": len(pieces)})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _sse(pieces: list[str]) -> bytes:
    events = [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
    events.append({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("kind", ["ollama", "vllm"])
async def test_one_write_of_many_tokens_is_relayed_in_few_messages(
    gw: RunningGateway, upstream: FakeUpstream, kind: str
) -> None:
    if kind == "ollama":
        upstream.script(Reply(raw=_ndjson(PIECES), content_type="application/x-ndjson"))
        endpoint = f"http://127.0.0.1:{upstream.port}"
    else:
        upstream.script(Reply(sse_raw=_sse(PIECES)))
        endpoint = upstream.base_url
    events = await _events(gw, _request(kind, endpoint))
    deltas = [e.delta.content for e in events if e.WhichOneof("event") == "delta"]
    # The whole answer was written at once (~40 KB): a handful of reads, never 1,000 messages.
    assert 1 <= len(deltas) <= 20, len(deltas)
    assert "".join(deltas) == "".join(PIECES)
    final = events[-1].completion
    assert final.choices[0].message.content == "".join(PIECES).strip()


async def test_an_error_after_some_lines_still_relays_the_lines_before_it(
    gw: RunningGateway, upstream: FakeUpstream
) -> None:
    body = _ndjson(PIECES[:3]).split(b"\n")[0] + b"\n" + b"{not json\n"
    upstream.script(Reply(raw=body, content_type="application/x-ndjson"))
    received: list[chat_pb2.StreamCreateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gw.chat.StreamCreate(
            _request("ollama", f"http://127.0.0.1:{upstream.port}"), timeout=30
        ):
            received.append(event)
    expect(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE")
    assert "".join(e.delta.content for e in received) == PIECES[0]
