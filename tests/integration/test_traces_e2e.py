"""Provider traces end to end: through the real server, into every backend, out through the RPCs.

Each test runs the real gateway (in-process, or as a subprocess for the shutdown test) against
the fake OpenAI-compatible upstream, then reads traces back through ProviderTraceService or
straight from the store (SQLite file, PostgreSQL rows, ClickHouse rows, socket NDJSON).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from llmgateway.v1 import chat_pb2, chat_pb2_grpc, providers_pb2, traces_pb2

from server.auth.factory import create_auth_store
from server.inflight import CANCELLED_BY_CALLER
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.process_harness import async_server_process
from tests.trace_polling import eventually, list_all, wait_for_count, wait_for_trace
from tests.trace_services import (
    ClickHouseServer,
    PostgresServer,
    free_port,
    fresh_clickhouse_database,
    fresh_postgres_database,
)

# The session-scoped PostgreSQL and ClickHouse servers (started on first use, stopped at the end).

ENV_KEY = "sk-canary-env-3f9a1c7e5d2b4a60"
BYOK_KEY = "sk-canary-byok-8e1d0b6c4a2f9e71"
ENCRYPTION_PASSPHRASE = "test-passphrase-not-a-secret"


def traced_request(
    upstream: FakeUpstream,
    step: str,
    *,
    run: str = "run-1",
    agent: str = "agent-1",
    user: str = "user-1",
    call_type: str = "agent_step",
    tags: tuple[str, ...] = ("t1", "t2"),
    **fields: Any,
) -> chat_pb2.CreateRequest:
    return chat_request(
        upstream.base_url,
        user_id=user,
        trace=chat_pb2.TraceContext(step_id=step, agent_id=agent, run_id=run, call_type=call_type, tags=tags),
        **fields,
    )


def stream_request(request: chat_pb2.CreateRequest) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())


def assert_no_key(data: str | bytes, *keys: str) -> None:
    blob = data if isinstance(data, bytes) else data.encode()
    for key in keys:
        assert key.encode() not in blob, f"key {key[:12]}... leaked"
        # A partial leak (the key minus its prefix) counts too.
        assert key[-16:].encode() not in blob, f"key tail of {key[:12]}... leaked"


# --- a real Unix socket listener ---------------------------------------------------------------


@dataclass
class NdjsonListener:
    """A sidecar stand-in: accepts connections on a Unix socket and keeps every byte received."""

    path: str
    raw: bytearray = field(default_factory=bytearray)
    connections: int = 0
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.raw.extend(chunk)
        finally:
            writer.close()

    @property
    def records(self) -> list[dict[str, Any]]:
        complete = bytes(self.raw).rpartition(b"\n")[0]
        return [json.loads(line) for line in complete.split(b"\n") if line]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gwsock-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def listener(short_dir: Path) -> AsyncIterator[NdjsonListener]:
    sidecar = NdjsonListener(str(short_dir / "telemetry.sock"))
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


# --- 1. the trace ------------------------------------------------------------------------------


async def test_create_trace_holds_what_went_up_and_came_back(tmp_path: Path, upstream: FakeUpstream) -> None:
    answer = completion(
        "Bonjour",
        usage={
            "prompt_tokens": 31,
            "completion_tokens": 5,
            "total_tokens": 36,
            "prompt_tokens_details": {"cached_tokens": 16},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    )
    upstream.script(Reply(json_body=answer))
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        openai_api_key=ENV_KEY,
        openai_base_url=upstream.base_url,
    )
    async with running_gateway(settings) as gw:
        before = datetime.now(UTC)
        request = traced_request(
            upstream,
            "step-create",
            run="run-c",
            agent="agent-c",
            user="user-c",
            call_type="summarization",
            tags=("alpha", "beta"),
        )
        response = await gw.chat.Create(request, timeout=10)
        after = datetime.now(UTC)
        trace = await wait_for_trace(gw.traces, "step-create")

    sent = upstream.requests[0]
    assert sent.headers["Authorization"] == f"Bearer {ENV_KEY}"  # the gateway did hold a real key
    assert trace.id == response.provider_trace_id
    assert json.loads(trace.request_json) == json.loads(sent.raw)
    assert json.loads(trace.response_json) == answer
    assert (trace.step_id, trace.agent_id, trace.run_id, trace.call_type) == (
        "step-create",
        "agent-c",
        "run-c",
        "summarization",
    )
    assert list(trace.agent_tags) == ["alpha", "beta"]
    assert trace.user_id == "user-c"
    assert trace.organization_id == "default"  # auth off: the anonymous organization
    assert (trace.provider, trace.model, trace.model_endpoint_type) == ("openai", "gpt-4o-mini", "openai")
    assert trace.is_byok is False
    u = trace.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (
        31,
        5,
        36,
        16,
        2,
    )
    assert trace.latency_ms > 0
    assert trace.time_to_first_token_ms == 0  # not a stream
    assert (trace.error_type, trace.error_message) == ("", "")
    created = trace.created_at.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= created <= after + timedelta(seconds=1)
    assert_no_key(trace.SerializeToString(), ENV_KEY)


async def test_stream_trace_holds_the_assembled_answer(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_stream(["Hel", "lo", " world"]), chunk_delay=0.01))
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        openai_api_key=ENV_KEY,
        openai_base_url=upstream.base_url,
    )
    async with running_gateway(settings) as gw:
        request = stream_request(traced_request(upstream, "step-stream"))
        events = [e async for e in gw.chat.StreamCreate(request, timeout=10)]
        trace = await wait_for_trace(gw.traces, "step-stream")

    assert trace.id == events[-1].provider_trace_id
    assert json.loads(trace.request_json) == json.loads(upstream.requests[0].raw)
    assembled = json.loads(trace.response_json)
    assert assembled["choices"][0]["message"]["content"] == "Hello world"
    assert assembled["choices"][0]["finish_reason"] == "stop"
    assert "data:" not in trace.response_json  # the answer, not the SSE transcript
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens, trace.usage.total_tokens) == (20, 7, 27)
    assert 0 < trace.time_to_first_token_ms <= trace.latency_ms
    assert trace.latency_ms >= 30  # three chunks 10 ms apart
    assert trace.error_type == ""
    assert_no_key(trace.SerializeToString(), ENV_KEY)


async def test_failed_call_is_traced_with_its_error(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            status=400,
            json_body={"error": {"message": "Invalid 'messages': bad role", "type": "invalid_request_error"}},
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.chat.Create(traced_request(upstream, "step-400"), timeout=10)
    trace = await wait_for_trace(gateway.traces, "step-400")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trace.error_type == "UPSTREAM_REJECTED"
    assert "bad role" in trace.error_message
    kept = json.loads(trace.response_json)  # the upstream's error body, scrubbed and bounded (issue 14)
    assert kept["http_status"] == 400 and "bad role" in kept["body"] and kept["truncated"] is False
    assert json.loads(trace.request_json) == json.loads(upstream.requests[0].raw)
    assert trace.latency_ms > 0


async def test_failed_stream_is_traced(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=400, json_body={"error": {"message": "nope"}}))
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in gateway.chat.StreamCreate(
            stream_request(traced_request(upstream, "step-s400")), timeout=10
        ):
            pass
    trace = await wait_for_trace(gateway.traces, "step-s400")
    assert trace.error_type == "UPSTREAM_REJECTED"
    assert trace.error_message
    kept = json.loads(trace.response_json)  # the upstream's error body, scrubbed and bounded (issue 14)
    assert kept["http_status"] == 400 and "nope" in kept["body"]


async def test_cancelled_call_is_traced(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(hang=True))
    call = gateway.chat.Create(traced_request(upstream, "step-cancel"), timeout=30)
    await eventually(lambda: len(upstream.requests) == 1, message="the upstream never got the call")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    trace = await wait_for_trace(gateway.traces, "step-cancel")
    assert trace.error_type  # today "CancelledError"
    assert "cancelled" in trace.error_message
    assert trace.response_json == ""


async def test_deadline_exceeded_call_is_traced(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(hang=True))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.chat.Create(traced_request(upstream, "step-deadline"), timeout=0.5)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    trace = await wait_for_trace(gateway.traces, "step-deadline")
    assert trace.error_type == "DEADLINE_EXCEEDED"
    assert "deadline" in trace.error_message
    assert trace.response_json == ""
    assert trace.latency_ms > 0


async def test_cancelled_stream_is_traced(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_stream(["a", "b", "c", "d", "e", "f"]), chunk_delay=0.5))
    call = gateway.chat.StreamCreate(stream_request(traced_request(upstream, "step-scancel")), timeout=30)
    async for event in call:
        if event.HasField("delta") and event.delta.content:
            break  # one token received, then hang up
    call.cancel()
    trace = await wait_for_trace(gateway.traces, "step-scancel")
    assert trace.error_type
    assert trace.time_to_first_token_ms > 0


async def test_an_abandoned_stream_keeps_its_partial_answer(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Paced: each delta is a read of its own (the stream loop's one-chunk fast path), the first
    # one text already (no role-only chunk before it): the first-token time is the fast path's.
    words = text_stream(["a", "b", "c", "d", "e", "f"])[1:]
    upstream.script(Reply(sse=words, chunk_delay=0.3))
    call = gateway.chat.StreamCreate(stream_request(traced_request(upstream, "step-spartial")), timeout=30)
    seen = ""
    async for event in call:
        seen += event.delta.content
        if len(seen) >= 2:
            break  # two pieces received (merged if one read brought both), then hang up
    call.cancel()
    trace = await wait_for_trace(gateway.traces, "step-spartial")
    assert (trace.error_type, trace.error_message) == CANCELLED_BY_CALLER
    assert 0 < trace.time_to_first_token_ms <= trace.latency_ms
    partial = json.loads(trace.response_json)
    assert partial["choices"][0]["message"]["content"].startswith(seen)


# --- 2. ListProviderTraces ---------------------------------------------------------------------


async def test_list_filters_pages_newest_first(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    ids: list[str] = []
    for i in range(7):
        request = traced_request(upstream, f"step-{i % 3}", run=f"run-{i % 2}", agent=f"agent-{i % 4}")
        ids.append((await gateway.chat.Create(request, timeout=10)).provider_trace_id)
        await asyncio.sleep(0.002)  # distinct created_at for a stable order
    stub = gateway.traces
    everything = await wait_for_count(stub, 7)
    assert [t.id for t in everything] == ids[::-1]  # newest first
    times = [t.created_at.ToDatetime(tzinfo=UTC) for t in everything]
    assert times == sorted(times, reverse=True)

    async def listed(**filters: Any) -> list[str]:
        return [t.id for t in await list_all(stub, traces_pb2.ListProviderTracesRequest(**filters))]

    assert await listed(step_id="step-1") == [ids[4], ids[1]]
    assert await listed(run_id="run-0") == [ids[6], ids[4], ids[2], ids[0]]
    assert await listed(agent_id="agent-3") == [ids[3]]
    assert await listed(run_id="run-1", agent_id="agent-1") == [ids[5], ids[1]]
    assert await listed(step_id="missing") == []

    # Time range: start inclusive, end exclusive, on the traces' own timestamps.
    start, end = everything[5].created_at, everything[1].created_at  # ids[1] .. ids[5]
    assert await listed(start_time=start, end_time=end) == [ids[4], ids[3], ids[2], ids[1]]
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert await listed(start_time=future) == []

    # Paging: page_size + page_token walk everything once, in order.
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_size=3, page_token=token), timeout=5
        )
        assert len(page.traces) <= 3
        seen += [t.id for t in page.traces]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1] and pages == 3
    # Paging composes with a filter.
    first = await stub.ListProviderTraces(
        traces_pb2.ListProviderTracesRequest(run_id="run-0", page_size=2), timeout=5
    )
    second = await stub.ListProviderTraces(
        traces_pb2.ListProviderTracesRequest(run_id="run-0", page_size=2, page_token=first.next_page_token),
        timeout=5,
    )
    assert [t.id for t in first.traces] + [t.id for t in second.traces] == [ids[6], ids[4], ids[2], ids[0]]
    assert second.next_page_token == ""


@pytest.mark.parametrize("token", ["not-a-token", "!!!", "bm9jb2xvbg", "MTIzNDU2Nzg5MA"])
async def test_list_refuses_a_bad_page_token(gateway: RunningGateway, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_token=token), timeout=5
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_needs_a_step_and_unknown_steps_are_not_found(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(), timeout=5)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(step_id="nope"), timeout=5)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_returns_the_latest_trace_of_the_step(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    first = await gateway.chat.Create(traced_request(upstream, "step-retry"), timeout=10)
    await wait_for_trace(gateway.traces, "step-retry", trace_id=first.provider_trace_id)
    second = await gateway.chat.Create(traced_request(upstream, "step-retry"), timeout=10)
    trace = await wait_for_trace(gateway.traces, "step-retry", trace_id=second.provider_trace_id)
    assert trace.id == second.provider_trace_id != first.provider_trace_id


# --- 3. organization scoping -------------------------------------------------------------------


async def test_traces_are_scoped_to_the_callers_organization(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), auth="required")
    store = create_auth_store(settings)
    await store.start()
    try:
        _, key_a = await store.create_key(organization_id="org-a", user_id="alice")
        _, key_b = await store.create_key(organization_id="org-b", user_id="bob")
    finally:
        await store.close()
    as_a = (("authorization", f"Bearer {key_a}"),)
    as_b = (("authorization", f"Bearer {key_b}"),)
    async with running_gateway(settings) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gw.chat.Create(traced_request(upstream, "step-shared"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        created = await gw.chat.Create(
            traced_request(upstream, "step-shared", user=""), metadata=as_a, timeout=10
        )
        trace = await wait_for_trace(gw.traces, "step-shared", metadata=as_a)
        assert trace.id == created.provider_trace_id
        assert trace.organization_id == "org-a"
        assert trace.user_id == "alice"  # from the key, when the request names no user

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id="step-shared"), metadata=as_b, timeout=5
            )
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert await list_all(gw.traces, metadata=as_b) == []
        assert (
            await list_all(
                gw.traces, traces_pb2.ListProviderTracesRequest(step_id="step-shared"), metadata=as_b
            )
            == []
        )
        # A page token issued to org A gives org B nothing of A's either.
        await gw.chat.Create(traced_request(upstream, "step-a2"), metadata=as_a, timeout=10)
        page = await wait_for_count(gw.traces, 2, metadata=as_a)
        assert {t.organization_id for t in page} == {"org-a"}
        first = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_size=1), metadata=as_a, timeout=5
        )
        assert first.next_page_token
        stolen = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_token=first.next_page_token), metadata=as_b, timeout=5
        )
        assert list(stolen.traces) == []
        # B's own trace is B's.
        await gw.chat.Create(traced_request(upstream, "step-shared"), metadata=as_b, timeout=10)
        trace_b = await wait_for_trace(gw.traces, "step-shared", metadata=as_b)
        assert trace_b.organization_id == "org-b" and trace_b.id != trace.id
        again = await wait_for_trace(gw.traces, "step-shared", metadata=as_a)
        assert again.id == trace.id
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gw.traces.ListProviderTraces(traces_pb2.ListProviderTracesRequest(), timeout=5)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- 4. backends through the server ------------------------------------------------------------


async def _create_and_check(
    gw: RunningGateway, upstream: FakeUpstream, step: str
) -> traces_pb2.ProviderTrace:
    response = await gw.chat.Create(traced_request(upstream, step), timeout=10)
    trace = await wait_for_trace(gw.traces, step, trace_id=response.provider_trace_id, timeout=20)
    assert json.loads(trace.request_json) == json.loads(upstream.requests[-1].raw)
    assert json.loads(trace.response_json) == completion()
    assert trace.usage.total_tokens == 15 and trace.latency_ms > 0
    return trace


async def test_sqlite_backend_via_the_server(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), trace_backends=("sqlite",))
    async with running_gateway(settings) as gw:
        trace = await _create_and_check(gw, upstream, "step-sqlite")
    with sqlite3.connect(settings.sqlite_path) as conn:
        rows = conn.execute("SELECT id, step_id, organization_id FROM provider_traces").fetchall()
    assert rows == [(trace.id, "step-sqlite", "default")]


@pytest.mark.slow
async def test_postgres_backend_via_the_server(
    tmp_path: Path, upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), trace_backends=("postgres",), postgres_dsn=dsn
    )
    async with running_gateway(settings) as gw:
        trace = await _create_and_check(gw, upstream, "step-pg")
        upstream.script(Reply(sse=text_stream(["pg"])))
        stream = [
            e
            async for e in gw.chat.StreamCreate(
                stream_request(traced_request(upstream, "step-pg-s")), timeout=10
            )
        ]
        streamed = await wait_for_trace(gw.traces, "step-pg-s", timeout=20)
        assert streamed.id == stream[-1].provider_trace_id and streamed.time_to_first_token_ms > 0
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, step_id FROM provider_traces ORDER BY created_at")
    finally:
        await conn.close()
    assert [(r["id"], r["step_id"]) for r in rows] == [(trace.id, "step-pg"), (streamed.id, "step-pg-s")]


@pytest.mark.slow
async def test_clickhouse_backend_via_the_server(
    tmp_path: Path, upstream: FakeUpstream, clickhouse_server: ClickHouseServer
) -> None:
    database = fresh_clickhouse_database()
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("clickhouse",),
        clickhouse_url=clickhouse_server.url(database),
    )
    async with running_gateway(settings) as gw:
        trace = await _create_and_check(gw, upstream, "step-ch")
        listed = await wait_for_count(gw.traces, 1)
        assert [t.id for t in listed] == [trace.id]
    rows = await asyncio.to_thread(
        clickhouse_server.query,
        f"SELECT id, step_id FROM {database}.provider_traces FINAL FORMAT JSONEachRow",
    )
    assert [json.loads(line) for line in rows.splitlines()] == [{"id": trace.id, "step_id": "step-ch"}]


async def test_socket_backend_receives_the_seed_record(
    tmp_path: Path, upstream: FakeUpstream, listener: NdjsonListener
) -> None:
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("sqlite", "socket"),
        trace_socket=listener.path,
    )
    async with running_gateway(settings) as gw:
        ok = await gw.chat.Create(
            traced_request(upstream, "step-sock", run="run-s", agent="agent-s", user="user-s", tags=("x",)),
            timeout=10,
        )
        upstream.script(Reply(status=400, json_body={"error": {"message": "broken request"}}))
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(traced_request(upstream, "step-sock-err"), timeout=10)
        await eventually(lambda: len(listener.records) == 2, message=f"socket got {listener.records}")
    good, bad = sorted(listener.records, key=lambda r: r["step_id"] != "step-sock")
    assert good["protocol_version"] == 3
    assert good["provider_trace_id"] == ok.provider_trace_id
    assert (good["step_id"], good["run_id"], good["agent_id"], good["tags"], good["type"]) == (
        "step-sock",
        "run-s",
        "agent-s",
        ["x"],
        "agent_step",
    )
    assert (good["org_id"], good["user_id"]) == ("default", "user-s")
    assert good["request"] == json.loads(upstream.requests[0].raw)
    assert good["response"] == completion()
    assert good["error"] is None
    assert good["llm_config"]["model"] == "gpt-4o-mini"
    datetime.fromisoformat(good["timestamp"].replace("Z", "+00:00"))
    assert bad["step_id"] == "step-sock-err"
    assert bad["response"] is None and "broken request" in bad["error"]
    assert bad["error_type"] == "UPSTREAM_REJECTED"


async def test_write_only_first_backend_refuses_reads(
    tmp_path: Path, upstream: FakeUpstream, listener: NdjsonListener
) -> None:
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("socket", "sqlite"),
        trace_socket=listener.path,
    )
    async with running_gateway(settings) as gw:
        response = await gw.chat.Create(traced_request(upstream, "step-wo"), timeout=10)
        await eventually(lambda: len(listener.records) == 1)
        for call, request in (
            (gw.traces.GetProviderTrace, traces_pb2.GetProviderTraceRequest(step_id="step-wo")),
            (gw.traces.ListProviderTraces, traces_pb2.ListProviderTracesRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(request, timeout=5)
            assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "write-only" in (failure.value.details() or "")
    assert listener.records[0]["provider_trace_id"] == response.provider_trace_id
    with sqlite3.connect(settings.sqlite_path) as conn:  # the second backend still got it
        assert conn.execute("SELECT id FROM provider_traces").fetchall() == [(response.provider_trace_id,)]


# --- 5. fan-out with a dead backend ------------------------------------------------------------


@pytest.mark.parametrize("dead", ["socket", "clickhouse"])
async def test_fan_out_with_a_dead_backend(
    tmp_path: Path, upstream: FakeUpstream, short_dir: Path, dead: str
) -> None:
    overrides: dict[str, Any] = {"trace_backends": ("sqlite", dead)}
    if dead == "socket":
        overrides["trace_socket"] = str(short_dir / "nobody-listens.sock")
    else:
        overrides["clickhouse_url"] = f"http://default:pw@127.0.0.1:{free_port()}/?database=x"  # closed port
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), **overrides)
    began = time.perf_counter()
    async with running_gateway(settings) as gw:
        started = time.perf_counter() - began
        count = 60
        latencies: list[float] = []

        async def one(i: int) -> str:
            t0 = time.perf_counter()
            response = await gw.chat.Create(traced_request(upstream, f"fan-{i}"), timeout=10)
            latencies.append(time.perf_counter() - t0)
            return str(response.provider_trace_id)

        ids = await asyncio.gather(*(one(i) for i in range(count)))
        traces = await wait_for_count(gw.traces, count)
        assert sorted(t.id for t in traces) == sorted(ids)
        assert max(latencies) < 2.0, f"slowest call {max(latencies):.2f}s with a dead {dead} backend"
        stopping = time.perf_counter()
    stopped = time.perf_counter() - stopping
    # Only the first (reader) backend is waited for at start-up; a dead one must not delay it.
    assert started < 3, f"start-up took {started:.1f}s with a dead {dead} backend"
    # Shutdown waits for the dead backend at most max(grace, 5 s), then counts its traces as dropped.
    assert stopped < 8, f"shutdown took {stopped:.1f}s with a dead {dead} backend"
    with sqlite3.connect(settings.sqlite_path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM provider_traces")) == sorted(ids)


# --- 6. nothing lost on SIGTERM ----------------------------------------------------------------


async def test_sigterm_after_a_burst_loses_no_trace(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Port 0 (the harness reads the bound port from the start-up line) rather than a "free" port
    # picked here: the server binds with SO_REUSEPORT, so a port picked in advance could be
    # shared with another server started in the meantime, silently splitting the calls.
    db = tmp_path / "gateway.db"
    count = 200
    async with async_server_process(tmp_path, allowed_endpoints=(upstream.base_url,)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            results = await asyncio.gather(
                *(chat.Create(traced_request(upstream, f"burst-{i}"), timeout=60) for i in range(count))
            )
            server.process.send_signal(signal.SIGTERM)  # right after the last answer
            code = await asyncio.to_thread(server.wait, 60)
        assert code == 0, f"exit code {code}:\n{server.log[-3000:]}"
    ids = {r.provider_trace_id for r in results}
    assert len(ids) == count and len(upstream.requests) == count
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM provider_traces")}
    missing = ids - stored
    assert not missing, f"{len(missing)} of {count} traces lost on SIGTERM:\n{server.log[-3000:]}"


# --- 7. no key anywhere ------------------------------------------------------------------------


async def _calls_with_every_key(
    gw: RunningGateway, upstream: FakeUpstream, *, echo_answers: bool = False
) -> list[str]:
    """Successful, streamed and failed calls with the env key and with a BYOK key; the trace ids.

    The failing upstreams echo the key they were given in their error (as OpenAI's 401 does). With
    `echo_answers`, successful answers echo it too (a debugging proxy; a stream splits it over two
    chunks, so only the assembled answer holds it whole).
    """
    await gw.providers.CreateProvider(
        providers_pb2.CreateProviderRequest(
            name="byok-prov", model_endpoint_type="openai", base_url=upstream.base_url, api_key=BYOK_KEY
        ),
        timeout=10,
    )
    byok_config = chat_pb2.LLMConfig(
        model="gpt-4o-mini",
        model_endpoint_type="openai",
        model_endpoint=upstream.base_url,
        context_window=128_000,
        provider_name="byok-prov",
        provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
    )
    ids: list[str] = []
    calls: list[tuple[str, dict[str, Any]]] = [(ENV_KEY, {}), (BYOK_KEY, {"llm_config": byok_config})]
    for key, extra in calls:
        n = len(upstream.requests)
        if echo_answers:
            upstream.script(Reply(json_body=completion(f"your header was Authorization: Bearer {key}")))
        ids.append(
            (await gw.chat.Create(traced_request(upstream, "key-ok", **extra), timeout=10)).provider_trace_id
        )
        words = ["your key is ", key[:10], key[10:]] if echo_answers else ["fine"]
        upstream.script(Reply(sse=text_stream(words)))
        events = [
            e
            async for e in gw.chat.StreamCreate(
                stream_request(traced_request(upstream, "key-s", **extra)), timeout=10
            )
        ]
        ids.append(events[-1].provider_trace_id)
        upstream.script(
            Reply(status=401, json_body={"error": {"message": f"Incorrect API key provided: {key}"}})
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(traced_request(upstream, "key-401", **extra), timeout=10)
        upstream.script(Reply(status=400, raw=f"bad request for Bearer {key}".encode()))
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.chat.Create(traced_request(upstream, "key-400", **extra), timeout=10)
        # The gateway really sent this key upstream.
        assert all(r.headers["Authorization"] == f"Bearer {key}" for r in upstream.requests[n:])
    traces = await wait_for_count(gw.traces, 8)
    assert {t.is_byok for t in traces} == {False, True}
    assert {t.provider for t in traces} == {"openai", "byok-prov"}
    assert_no_key(b"".join(t.SerializeToString() for t in await list_all(gw.traces)), ENV_KEY, BYOK_KEY)
    return ids


def _key_settings(tmp_path: Path, upstream: FakeUpstream, **overrides: Any) -> Any:
    return make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        openai_api_key=ENV_KEY,
        openai_base_url=upstream.base_url,
        encryption_key=ENCRYPTION_PASSPHRASE,
        **overrides,
    )


def _sqlite_bytes(path: str) -> bytes:
    return b"".join(p.read_bytes() for p in Path(path).parent.glob(Path(path).name + "*"))


async def test_no_key_in_sqlite_or_socket_records(
    tmp_path: Path, upstream: FakeUpstream, listener: NdjsonListener
) -> None:
    settings = _key_settings(
        tmp_path, upstream, trace_backends=("sqlite", "socket"), trace_socket=listener.path
    )
    async with running_gateway(settings) as gw:
        await _calls_with_every_key(gw, upstream)
        await eventually(lambda: len(listener.records) == 8, message="socket did not get every trace")
        assert_no_key(_sqlite_bytes(settings.sqlite_path), ENV_KEY, BYOK_KEY)  # WAL included, while running
    assert_no_key(_sqlite_bytes(settings.sqlite_path), ENV_KEY, BYOK_KEY)
    assert_no_key(bytes(listener.raw), ENV_KEY, BYOK_KEY)
    assert {r["is_byok"] for r in listener.records} == {False, True}


@pytest.mark.slow
async def test_no_key_in_postgres_or_clickhouse_records(
    tmp_path: Path,
    upstream: FakeUpstream,
    listener: NdjsonListener,
    postgres_server: PostgresServer,
    clickhouse_server: ClickHouseServer,
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    database = fresh_clickhouse_database()
    settings = _key_settings(
        tmp_path,
        upstream,
        trace_backends=("postgres", "clickhouse", "sqlite", "socket"),
        postgres_dsn=dsn,
        clickhouse_url=clickhouse_server.url(database),
        trace_socket=listener.path,
    )
    async with running_gateway(settings) as gw:
        ids = await _calls_with_every_key(gw, upstream)
    conn = await asyncpg.connect(dsn)
    try:
        pg_rows = [r[0] for r in await conn.fetch("SELECT row_to_json(t)::text FROM provider_traces t")]
    finally:
        await conn.close()
    ch_rows = await asyncio.to_thread(
        clickhouse_server.query, f"SELECT * FROM {database}.provider_traces FINAL FORMAT JSONEachRow"
    )
    assert len(pg_rows) == 8 and len(ch_rows.splitlines()) == 8
    assert set(ids) <= {json.loads(r)["id"] for r in pg_rows}
    assert_no_key("\n".join(pg_rows), ENV_KEY, BYOK_KEY)
    assert_no_key(ch_rows, ENV_KEY, BYOK_KEY)
    assert_no_key(_sqlite_bytes(settings.sqlite_path), ENV_KEY, BYOK_KEY)
    assert len(listener.records) == 8
    assert_no_key(bytes(listener.raw), ENV_KEY, BYOK_KEY)


async def test_no_key_when_the_upstream_echoes_it_in_an_answer(
    tmp_path: Path, upstream: FakeUpstream, listener: NdjsonListener
) -> None:
    # response_json must be scrubbed like request_json and error_message are.
    settings = _key_settings(
        tmp_path, upstream, trace_backends=("sqlite", "socket"), trace_socket=listener.path
    )
    async with running_gateway(settings) as gw:
        await _calls_with_every_key(gw, upstream, echo_answers=True)
        await eventually(lambda: len(listener.records) == 8, message="socket did not get every trace")
    assert_no_key(_sqlite_bytes(settings.sqlite_path), ENV_KEY, BYOK_KEY)
    assert_no_key(bytes(listener.raw), ENV_KEY, BYOK_KEY)
