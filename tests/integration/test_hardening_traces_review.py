"""Review of the trace hardening (issue 12 items 2, 9, 13): defects found attacking it.

Through the real server on each store: paging never loses traces of non-ASCII text (the stores
bound a page in UTF-8 bytes), and the ids and tags a caller puts in a trace are bounded on the
write path, so no trace can be too big to list.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import random
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from llmgateway.v1 import chat_pb2, traces_pb2

from server.api.traces import truncate
from server.auth.actor import ANONYMOUS_ORGANIZATION
from server.auth.factory import create_auth_store
from server.config import Settings
from server.traces.base import TraceQuery, TraceRecord, new_trace_id
from server.traces.clickhouse import ClickHouseTraceBackend
from server.traces.postgres import PostgresTraceBackend
from server.traces.sqlite import SQLiteTraceBackend
from server.traces.writer import TraceWriter, WriterRetry
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.trace_polling import list_all, wait_for_trace
from tests.trace_services import (
    ClickHouseServer,
    free_port,
    fresh_clickhouse_database,
    fresh_postgres_database,
)

PAGE_BYTES = 200_000

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.slow),
    pytest.param("clickhouse", marks=pytest.mark.slow),
]


@pytest.fixture(params=BACKENDS)
async def gw(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> AsyncIterator[RunningGateway]:
    overrides: dict[str, Any] = {"trace_backends": (request.param,)}
    if request.param == "postgres":
        overrides["postgres_dsn"] = await fresh_postgres_database(request.getfixturevalue("postgres_server"))
    elif request.param == "clickhouse":
        server = request.getfixturevalue("clickhouse_server")
        overrides["clickhouse_url"] = server.url(fresh_clickhouse_database())
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), trace_page_bytes=PAGE_BYTES, **overrides
    )
    async with running_gateway(settings) as running:
        yield running


async def create(gw: RunningGateway, upstream: FakeUpstream, step: str, text: str, run: str) -> str:
    request = chat_request(
        upstream.base_url,
        (chat_pb2.ROLE_USER, text),
        context_window=2_000_000,
        trace=chat_pb2.TraceContext(step_id=step, run_id=run),
    )
    response = await gw.chat.Create(request, timeout=30)
    return response.provider_trace_id


async def test_paging_never_loses_traces_of_non_ascii_text(
    gw: RunningGateway, upstream: FakeUpstream
) -> None:
    # 70,000 CJK characters: 210 kB of UTF-8, 70 kB of characters. PostgreSQL and ClickHouse stop
    # a page at the byte bound after one such trace; the page must still say more follow.
    ids = [await create(gw, upstream, f"cjk{i}", "中" * 70_000, "run-cjk") for i in range(3)]
    await wait_for_trace(gw.traces, "cjk2", trace_id=ids[-1])
    await wait_for_trace(gw.traces, "cjk0", trace_id=ids[0])
    traces = await list_all(gw.traces, traces_pb2.ListProviderTracesRequest(run_id="run-cjk", page_size=50))
    assert [t.id for t in traces] == list(reversed(ids))
    assert all(t.truncated for t in traces)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    found.update({v.field: v.description for v in bad.field_violations})
    return found


@pytest.mark.parametrize(
    ("trace", "user_id", "field"),
    [
        (chat_pb2.TraceContext(step_id="s" * 257), "", "trace.step_id"),
        (chat_pb2.TraceContext(run_id="r" * 257), "", "trace.run_id"),
        (chat_pb2.TraceContext(agent_id="a" * 257), "", "trace.agent_id"),
        (chat_pb2.TraceContext(call_type="c" * 257), "", "trace.call_type"),
        (chat_pb2.TraceContext(tags=["t"] * 257), "", "trace.tags"),
        (chat_pb2.TraceContext(tags=["ok", "t" * 257]), "", "trace.tags[1]"),
        (chat_pb2.TraceContext(), "u" * 257, "user_id"),
    ],
)
async def test_trace_ids_and_tags_are_bounded_on_the_write_path(
    tmp_path: Path, upstream: FakeUpstream, trace: chat_pb2.TraceContext, user_id: str, field: str
) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        request = chat_request(upstream.base_url, trace=trace, user_id=user_id)
        for rpc in (gw.chat.Create, gw.chat.CountTokens):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await rpc(request, timeout=10)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in violations(failure.value), failure.value.details()


async def test_letta_ids_and_tags_at_the_limits_are_accepted(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        trace = chat_pb2.TraceContext(
            step_id="step-" + "0" * 251,
            run_id="run-6f1d2c3e-8a9b-4c5d-9e0f-123456789abc",
            agent_id="agent-6f1d2c3e-8a9b-4c5d-9e0f-123456789abc",
            call_type="summarization",
            tags=["t" * 256] * 256,
        )
        request = chat_request(upstream.base_url, trace=trace, user_id="user-" + "1" * 251)
        response = await gw.chat.Create(request, timeout=10)
        got = await wait_for_trace(gw.traces, trace.step_id, trace_id=response.provider_trace_id)
        assert list(got.agent_tags) == list(trace.tags)


# --- item 9: the byte bound holds for non-ASCII text --------------------------------------------


async def test_a_lane_is_bounded_in_memory_for_non_ascii_text() -> None:
    # 100,000 emoji: 100 kB counted as characters, ~400 kB of memory (four bytes each in CPython).
    text = "\U0001f600" * 100_000
    dead = PostgresTraceBackend(f"postgresql://u:pw@127.0.0.1:{free_port()}/db")
    writer = TraceWriter(
        [dead], queue_bytes=1_000_000, retry=WriterRetry(initial_delay=0.01), start_timeout=0.01
    )
    await writer.start()
    queued: list[TraceRecord] = []
    for _ in range(20):
        queued.append(
            TraceRecord(id=new_trace_id(), created_at=datetime.now(UTC), request_json=text + str(_))
        )
        writer.enqueue(queued[-1])
    stats = writer.stats_for("postgres")
    pinned = sum(sys.getsizeof(r.request_json) for r in queued[len(queued) - stats.queued :])
    assert pinned <= 1_000_000, (stats.queued, pinned)
    await writer.close(timeout=0.2)


# --- item 13: no stored trace is too big to list ------------------------------------------------


async def test_a_trace_with_huge_metadata_does_not_block_the_listing(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # Stored before the write path bounded tags and ids: 300 kB of tags, a 50 kB step_id.
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,), trace_page_bytes=PAGE_BYTES)
    store = SQLiteTraceBackend(settings.sqlite_path)
    await store.start()
    now = datetime.now(UTC)
    old = TraceRecord(id=new_trace_id(), created_at=now, organization_id="default", run_id="r", step_id="old")
    huge = TraceRecord(
        id=new_trace_id(),
        created_at=now + timedelta(seconds=1),
        organization_id="default",
        run_id="r",
        step_id="s" * 50_000,
        agent_tags=["t" * 1000] * 300,
        request_json="{}",
    )
    await store.write_batch(records=[old, huge])
    await store.close()
    async with running_gateway(settings) as gw:
        traces = await list_all(gw.traces, traces_pb2.ListProviderTracesRequest(run_id="r"))
    assert [t.id for t in traces] == [huge.id, old.id]
    assert traces[0].truncated and traces[0].ByteSize() <= PAGE_BYTES
    assert not traces[1].truncated


def test_truncate_stays_within_its_budget_and_keeps_prefixes() -> None:
    rng = random.Random(12)
    alphabet = 'aé中😀"\\{}'
    for _ in range(200):

        def text(n: int) -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(n)))

        trace = traces_pb2.ProviderTrace(
            id=new_trace_id(),
            step_id=text(3000),
            run_id=text(300),
            user_id=text(300),
            agent_tags=[text(200) for _ in range(rng.randrange(100))],
            request_json=text(20_000),
            response_json=text(5000),
            error_message=text(500),
        )
        budget = rng.randrange(4096, 40_000)
        if trace.ByteSize() <= budget:
            continue
        cut = truncate(trace, budget)
        assert cut.ByteSize() <= budget and cut.truncated and cut.id == trace.id
        for name in ("step_id", "run_id", "user_id", "request_json", "response_json", "error_message"):
            assert getattr(trace, name).startswith(getattr(cut, name)), name
        assert list(trace.agent_tags[: len(cut.agent_tags)]) == list(cut.agent_tags)


# --- filters a caller controls: never INTERNAL, never another owner's traces --------------------

HOSTILE = [
    "a\x00b",
    "x' OR 1=1 --",
    "x\\' OR 1=1 --",
    "x\\",
    "\u2028\ud7ff\U0010ffff",
    "x`; DROP TABLE provider_traces",
]


async def test_hostile_filters_match_nothing_and_fail_nothing(
    gw: RunningGateway, upstream: FakeUpstream
) -> None:
    trace_id = await create(gw, upstream, "mine", "hello", "run-h")
    await wait_for_trace(gw.traces, "mine", trace_id=trace_id)
    for value in HOSTILE:
        for field in ("step_id", "run_id", "agent_id"):
            page = await gw.traces.ListProviderTraces(
                traces_pb2.ListProviderTracesRequest(**{field: value}), timeout=10
            )
            assert not page.traces, (field, value)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gw.traces.GetProviderTrace(traces_pb2.GetProviderTraceRequest(step_id=value), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND, (value, failure.value.details())
        token = base64.urlsafe_b64encode(f"99999999999999999:{value}".encode()).decode().rstrip("=")
        page = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_token=token), timeout=10
        )
        assert len(page.traces) <= 1, value
    # A step id with a NUL (PostgreSQL stores it as U+FFFD) is found by the id it was written with.
    nul_id = await create(gw, upstream, "nul\x00step", "hello", "run-h")
    got = await wait_for_trace(gw.traces, "nul\x00step", trace_id=nul_id)
    assert got.id == nul_id


# --- item 2: scopes across organizations, copied page tokens, auth off then on -------------------


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def make_key(settings: Settings, org: str, *, admin: bool = False, user: str = "") -> str:
    store = create_auth_store(settings)
    await store.start()
    try:
        _, key = await store.create_key(organization_id=org, user_id=user, is_admin=admin)
        return key
    finally:
        await store.close()


async def scoped_settings(request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream) -> Settings:
    backend = request.node.callspec.params["backend"]
    overrides: dict[str, Any] = {"trace_backends": (backend,)}
    if backend == "postgres":
        overrides["postgres_dsn"] = await fresh_postgres_database(request.getfixturevalue("postgres_server"))
    elif backend == "clickhouse":
        overrides["clickhouse_url"] = request.getfixturevalue("clickhouse_server").url(
            fresh_clickhouse_database()
        )
    return make_settings(tmp_path, auth="off", allowed_endpoints=(upstream.base_url,), **overrides)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_scopes_hold_across_orgs_tokens_and_auth_off_then_on(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream, backend: str
) -> None:
    settings = await scoped_settings(request, tmp_path, upstream)
    async with running_gateway(settings) as gw:  # auth off: owner ""
        response = await gw.chat.Create(
            chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="anon", run_id="run")),
            timeout=10,
        )
        await wait_for_trace(gw.traces, "anon", trace_id=response.provider_trace_id)
    settings = dataclasses.replace(settings, auth="required")
    alice_a = await make_key(settings, "org-a", user="alice")
    alice_b = await make_key(settings, "org-b", user="alice")  # the same user id, another organization
    admin_a = await make_key(settings, "org-a", admin=True)
    user_default = await make_key(settings, ANONYMOUS_ORGANIZATION, user="carol")
    keyless_default = await make_key(settings, ANONYMOUS_ORGANIZATION)
    admin_default = await make_key(settings, ANONYMOUS_ORGANIZATION, admin=True)
    async with running_gateway(settings) as gw:
        for i in range(3):
            for key, who in ((alice_a, "a"), (alice_b, "b"), (admin_a, "admin")):
                request_ = chat_request(
                    upstream.base_url, trace=chat_pb2.TraceContext(step_id=f"{who}-{i}", run_id="run")
                )
                response = await gw.chat.Create(request_, metadata=bearer(key), timeout=10)
        await wait_for_trace(
            gw.traces, "admin-2", metadata=bearer(admin_a), trace_id=response.provider_trace_id
        )
        await wait_for_trace(gw.traces, "a-2", metadata=bearer(alice_a))
        await wait_for_trace(gw.traces, "b-2", metadata=bearer(alice_b))

        async def steps(key: str) -> list[str]:
            traces = await list_all(
                gw.traces,
                traces_pb2.ListProviderTracesRequest(run_id="run", page_size=1),
                metadata=bearer(key),
            )
            return [t.step_id for t in traces]

        assert await steps(alice_a) == ["a-2", "a-1", "a-0"]
        assert await steps(alice_b) == ["b-2", "b-1", "b-0"]
        assert await steps(admin_a) == ["admin-2", "a-2", "admin-1", "a-1", "admin-0", "a-0"]
        # Auth-off traces: the anonymous organization's admins only.
        assert await steps(admin_default) == ["anon"]
        assert await steps(user_default) == []
        assert await steps(keyless_default) == []
        # A page token copied from the admin's listing moves the cursor, never the scope.
        first = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_size=1), metadata=bearer(admin_a), timeout=10
        )
        assert first.traces[0].step_id == "admin-2"
        for key, expected in (
            (alice_a, ["a-2", "a-1", "a-0"]),
            (alice_b, ["b-2", "b-1", "b-0"]),
            (user_default, []),
        ):
            page = await gw.traces.ListProviderTraces(
                traces_pb2.ListProviderTracesRequest(page_size=10, page_token=first.next_page_token),
                metadata=bearer(key),
                timeout=10,
            )
            assert [t.step_id for t in page.traces] == expected
        for key in (alice_b, user_default):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await gw.traces.GetProviderTrace(
                    traces_pb2.GetProviderTraceRequest(step_id="a-0"), metadata=bearer(key)
                )
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
async def test_clickhouse_reads_back_a_trace_with_non_finite_floats(
    clickhouse_server: ClickHouseServer,
) -> None:
    # ClickHouse stores NaN and infinities and answers them as JSON null: one such row made every
    # read that reached it fail (float(None)), INTERNAL.
    backend = ClickHouseTraceBackend(clickhouse_server.url(fresh_clickhouse_database()))
    await backend.start()
    try:
        odd = TraceRecord(
            id=new_trace_id(),
            created_at=datetime.now(UTC),
            organization_id="o",
            step_id="odd",
            latency_ms=math.nan,
            time_to_first_token_ms=math.inf,
        )
        await backend.write_batch(records=[odd])
        got = await backend.get_latest(organization_id="o", step_id="odd")
        assert got is not None and got.id == odd.id
        assert [
            r.id for r in await backend.list(query=TraceQuery(organization_id="o", max_bytes=10_000))
        ] == [odd.id]
    finally:
        await backend.close()
