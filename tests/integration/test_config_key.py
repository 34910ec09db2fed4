"""The LLMConfig is serialized once per call (per attempt of a routed one) and the bytes shared by
the caches keyed by them (validation's, the body's, the trace's copy): each attempt still sends
and traces its own config, and a config over the cacheable size is worked out anew, never kept."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from llmgateway.v1 import chat_pb2

from server.core import openai_request, trace_scrub, validation
from server.core.config_cache import MAX_CACHED_CONFIG_BYTES
from server.traces.base import TraceRecord
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway

USER = chat_pb2.ROLE_USER


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream() for _ in range(2)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def _queued(monkeypatch: pytest.MonkeyPatch) -> list[TraceRecord]:
    """The records the gateway queues, as they are queued."""
    records: list[TraceRecord] = []
    real = trace_scrub.queue

    def recording(record: TraceRecord, *args: Any) -> None:
        real(record, *args)
        records.append(record)

    monkeypatch.setattr(trace_scrub, "queue", recording)
    return records


def _fallback_request(fakes: list[FakeUpstream]) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="m0", model_endpoint_type="openai", model_endpoint=fakes[0].base_url, temperature=0.5
        ),
        fallbacks=[
            chat_pb2.LLMConfig(model="m1", model_endpoint_type="openai", model_endpoint=fakes[1].base_url)
        ],
        messages=[chat_pb2.Message(role=USER, content="hi")],
    )


def _traced_config(record: TraceRecord) -> dict[str, Any]:
    return json.loads(record.llm_config_json)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True])
async def test_each_attempt_sends_and_traces_its_own_config(
    tmp_path: Path, fakes: list[FakeUpstream], monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    records = _queued(monkeypatch)
    fakes[0].script(Reply(status=502, raw=b"bad gateway"))
    if stream:
        fakes[1].script(Reply(sse=text_stream(["Hello"])))
    request = _fallback_request(fakes)
    settings = make_settings(tmp_path, allowed_endpoints=(fakes[0].base_url, fakes[1].base_url))
    async with running_gateway(settings) as gw:
        if stream:
            events = [e async for e in gw.chat.StreamCreate(request, timeout=10)]
            assert events[-1].deployment.name == "fallbacks[0]"
        else:
            response = await gw.chat.Create(request, timeout=10)
            assert response.deployment.name == "fallbacks[0]"
    assert fakes[0].requests[0].body["model"] == "m0" and fakes[0].requests[0].body["temperature"] == 0.5
    assert fakes[1].requests[0].body["model"] == "m1" and "temperature" not in fakes[1].requests[0].body
    assert [_traced_config(r) for r in records] == [
        {
            "model": "m0",
            "modelEndpointType": "openai",
            "modelEndpoint": fakes[0].base_url,
            "temperature": 0.5,
        },
        {"model": "m1", "modelEndpointType": "openai", "modelEndpoint": fakes[1].base_url},
    ]


def _huge_config(base_url: str) -> chat_pb2.LLMConfig:
    schema = struct_pb2.Struct()
    schema.update(
        {"type": "object", "properties": {"answer": {"type": "string", "description": "d" * 70_000}}}
    )
    config = chat_pb2.LLMConfig(
        model="gpt-4o-mini", model_endpoint_type="openai", model_endpoint=base_url, context_window=128_000
    )
    config.response_format.type = "json_schema"
    config.response_format.json_schema.name = "reply"
    config.response_format.json_schema.schema.CopyFrom(schema)
    return config


def _cached_keys(gw: RunningGateway) -> list[bytes]:
    assert gw.server.gateway is not None
    body_keys = [key for key, _ in openai_request._CONFIG_BODIES.keys()]
    return [*validation._CONFIG_CHECKS, *body_keys, *gw.server.gateway._config_json_cache]


async def test_a_config_over_the_cacheable_size_is_worked_out_anew_and_never_kept(
    upstream: FakeUpstream, gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _queued(monkeypatch)
    config = _huge_config(upstream.base_url)
    size = len(config.SerializeToString())
    assert size > MAX_CACHED_CONFIG_BYTES
    assert size > validation.MAX_CACHED_CONFIG_BYTES and size > openai_request.MAX_CACHED_CONFIG_BYTES
    for handle in ("first", "second"):  # the second call: nothing of the first one was kept
        config.handle = handle
        request = chat_request(upstream.base_url, llm_config=config)
        upstream.script(Reply(json_body=completion('{"answer": "x"}')))
        response = await gateway.chat.Create(request, timeout=10)
        assert response.completion.choices[0].message.content == '{"answer": "x"}'
        sent = upstream.requests[-1].body["response_format"]
        assert sent["json_schema"]["schema"]["properties"]["answer"]["description"] == "d" * 70_000
        traced = _traced_config(records[-1])
        assert traced == json.loads(json_format.MessageToJson(config, indent=None))
        assert traced["handle"] == handle
        assert all(len(key) <= MAX_CACHED_CONFIG_BYTES for key in _cached_keys(gateway))
