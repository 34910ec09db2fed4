"""The usage API against every readable trace backend: SQLite, PostgreSQL, ClickHouse.

The same traces go into each store and the same sums must come back, to the pico-dollar:
costs with twelve fractional digits, an unpriced call (counted apart, never as 0), a failed
call, another organization's traces and traces outside the range (both left out). Then
UsageService.GetUsage end to end through the gateway on each store as the first backend, with
its scoping: a non-admin key sees its own calls only.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from llmgateway.v1 import usage_pb2, usage_pb2_grpc

from server.auth.factory import create_auth_store
from server.billing.cost import dollars
from server.traces.base import TraceBackend, TraceRecord, new_trace_id
from server.traces.clickhouse import ClickHouseTraceBackend
from server.traces.postgres import PostgresTraceBackend
from server.traces.sqlite import SQLiteTraceBackend
from server.traces.usage import UsageQuery
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_errors_support import expect
from tests.integration.test_trace_backends import fresh_postgres_dsn
from tests.trace_polling import wait_for_trace

DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 23, 59, 59, tzinfo=UTC)
START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC)


def record(at: datetime, **fields: Any) -> TraceRecord:
    values: dict[str, Any] = {
        "organization_id": "acme",
        "model": "gpt-4o",
        "key_id": "k1",
        "user_id": "alice",
    }
    values.update(fields)
    return TraceRecord(id=new_trace_id(), created_at=at, **values)


TRACES = [
    # day 1, gpt-4o, key k1 / alice
    record(DAY1, prompt_tokens=2000, cached_tokens=1200, completion_tokens=500, total_tokens=2500,
           cost_usd="0.0085"),
    record(DAY1, prompt_tokens=10, completion_tokens=1, total_tokens=11, cost_usd="0.000000000001"),
    # day 1, claude, key k2 / bob, with cache writes
    record(DAY1, model="claude-sonnet-4-5", key_id="k2", user_id="bob", prompt_tokens=25100,
           cached_tokens=20000, cache_write_tokens=5000, completion_tokens=400, total_tokens=25500,
           cost_usd="0.0378"),
    # day 2: an unpriced call, a failed one, a big exact cost
    record(DAY2, model="gpt-99", prompt_tokens=100, completion_tokens=10, total_tokens=110, cost_usd=None),
    record(DAY2, error_type="UPSTREAM_UNAVAILABLE", error_message="reset"),
    record(DAY2, key_id="k2", user_id="bob", prompt_tokens=1, completion_tokens=1, total_tokens=2,
           reasoning_tokens=1, cost_usd="123.456789012345"),
    # left out: another organization, before and after the range
    record(DAY1, organization_id="globex", cost_usd="1000"),
    record(START - timedelta(microseconds=1), cost_usd="1000"),
    record(END, cost_usd="1000"),
]  # fmt: skip


def rows(totals: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (t.day, t.model, t.key_id, t.user_id, t.requests, t.errors, t.prompt_tokens,
         t.completion_tokens, t.total_tokens, t.cached_tokens, t.cache_write_tokens,
         t.reasoning_tokens, dollars(t.cost_pico), t.unpriced)
        for t in totals
    ]  # fmt: skip


# Hand sums: whole range, organization acme: 6 calls, 1 error, 1 unpriced;
# cost 0.0085 + 0.000000000001 + 0.0378 + 123.456789012345 = 123.503089012346
WHOLE = [("", "", "", "", 6, 1, 27211, 912, 28123, 21200, 5000, 1, "123.503089012346", 1)]
BY_DAY_MODEL = [
    ("2026-03-01", "claude-sonnet-4-5", "", "", 1, 0, 25100, 400, 25500, 20000, 5000, 0, "0.0378", 0),
    ("2026-03-01", "gpt-4o", "", "", 2, 0, 2010, 501, 2511, 1200, 0, 0, "0.008500000001", 0),
    ("2026-03-02", "gpt-4o", "", "", 2, 1, 1, 1, 2, 0, 0, 1, "123.456789012345", 0),
    ("2026-03-02", "gpt-99", "", "", 1, 0, 100, 10, 110, 0, 0, 0, "0", 1),
]
BY_KEY_FOR_BOB = [("", "", "k2", "bob", 2, 0, 25101, 401, 25502, 20000, 5000, 1, "123.494589012345", 0)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow),
                        pytest.param("clickhouse", marks=pytest.mark.slow)])  # fmt: skip
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TraceBackend]:
    backend: TraceBackend
    if request.param == "sqlite":
        backend = SQLiteTraceBackend(str(tmp_path / "traces.db"))
    elif request.param == "postgres":
        backend = PostgresTraceBackend(await fresh_postgres_dsn(request.getfixturevalue("postgres_server")))
    else:
        url = request.getfixturevalue("clickhouse_server").url(f"t_{uuid.uuid4().hex[:12]}")
        backend = ClickHouseTraceBackend(url)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def test_the_same_sums_from_every_store(store: TraceBackend) -> None:
    await store.write_batch(records=TRACES)
    await store.write_batch(records=TRACES[:2])  # a retried batch: the same ids, counted once
    query = UsageQuery(organization_id="acme", start_time=START, end_time=END)
    assert rows(await store.usage(query=query)) == WHOLE
    by_day = UsageQuery(organization_id="acme", start_time=START, end_time=END, group_by=("day", "model"))
    assert rows(await store.usage(query=by_day)) == BY_DAY_MODEL
    bob = UsageQuery(
        organization_id="acme", start_time=START, end_time=END, group_by=("key_id", "user_id"), user_id="bob"
    )
    assert rows(await store.usage(query=bob)) == BY_KEY_FOR_BOB
    empty = UsageQuery(organization_id="nobody", start_time=START, end_time=END)
    assert await store.usage(query=empty) == []


def stamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.slow),
        pytest.param("clickhouse", marks=pytest.mark.slow),
    ],
)
async def test_get_usage_through_the_gateway(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> None:
    extra: dict[str, Any] = {}
    if kind == "postgres":
        extra = {
            "trace_backends": ("postgres",),
            "postgres_dsn": await fresh_postgres_dsn(request.getfixturevalue("postgres_server")),
        }
    elif kind == "clickhouse":
        url = request.getfixturevalue("clickhouse_server").url(f"t_{uuid.uuid4().hex[:12]}")
        extra = {"trace_backends": ("clickhouse",), "clickhouse_url": url}
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,), **extra)
    async with create_auth_store(settings) as keys:  # the server's key store (PostgreSQL's with a DSN)
        admin_id, admin = await keys.create_key(organization_id="acme", is_admin=True)
        alice_id, alice = await keys.create_key(organization_id="acme", user_id="alice")
        _, outsider = await keys.create_key(organization_id="globex", is_admin=True)
    # gpt-4o, 2000 prompt (1200 cached) + 500 output: $0.0085 a call (test_billing has the sum).
    usage = {"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
             "prompt_tokens_details": {"cached_tokens": 1200}}  # fmt: skip
    upstream.script(*(Reply(json_body=completion(usage=usage)) for _ in range(3)))
    async with running_gateway(settings) as gw:
        for step, token in (("s1", admin), ("s2", alice), ("s3", alice)):
            metadata = [("authorization", f"Bearer {token}")]
            await gw.chat.Create(
                chat_request(upstream.base_url, model="gpt-4o", trace={"step_id": step}),
                metadata=metadata,
                timeout=10,
            )
            await wait_for_trace(gw.traces, step, metadata=metadata)
        stub = usage_pb2_grpc.UsageServiceStub(gw.channel)
        now = datetime.now(UTC)
        query = usage_pb2.GetUsageRequest(
            start_time=stamp(now - timedelta(hours=1)),
            end_time=stamp(now + timedelta(hours=1)),
            group_by=[usage_pb2.USAGE_GROUP_BY_KEY, usage_pb2.USAGE_GROUP_BY_MODEL],
        )
        answer = await stub.GetUsage(query, metadata=[("authorization", f"Bearer {admin}")], timeout=10)
        got = sorted((r.key_id, r.model, r.requests, r.total_tokens, r.cost_usd) for r in answer.rows)
        # 0.0085 x 2 = 0.017 for alice's key, 0.0085 for the admin's.
        assert got == sorted(
            [(admin_id, "gpt-4o", 1, 2500, "0.0085"), (alice_id, "gpt-4o", 2, 5000, "0.017")]
        )
        # A non-admin key sees its own calls only, and may not ask for another user's.
        mine = await stub.GetUsage(
            usage_pb2.GetUsageRequest(start_time=query.start_time, end_time=query.end_time),
            metadata=[("authorization", f"Bearer {alice}")],
            timeout=10,
        )
        assert [(r.requests, r.cost_usd) for r in mine.rows] == [(2, "0.017")]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetUsage(
                usage_pb2.GetUsageRequest(
                    start_time=query.start_time, end_time=query.end_time, user_id="bob"
                ),
                metadata=[("authorization", f"Bearer {alice}")],
            )
        expect(info.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        # Another organization's admin sees nothing of acme's.
        theirs = await stub.GetUsage(
            usage_pb2.GetUsageRequest(start_time=query.start_time, end_time=query.end_time),
            metadata=[("authorization", f"Bearer {outsider}")],
        )
        assert list(theirs.rows) == []
        # A range is required and bounded.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetUsage(usage_pb2.GetUsageRequest(), metadata=[("authorization", f"Bearer {admin}")])
        expect(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
