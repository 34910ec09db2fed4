"""Every readable trace backend against the real store: SQLite files, PostgreSQL, ClickHouse.

The same round-trip tests run on each; PostgreSQL and ClickHouse are real servers started
once per session from Debian's packages (installed by scripts/install-test-services when
missing) and stopped after. Each test gets a fresh database.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from server.traces.base import TraceBackend, TraceQuery, TraceRecord, new_trace_id
from server.traces.clickhouse import MIGRATIONS as CLICKHOUSE_MIGRATIONS
from server.traces.clickhouse import ClickHouseError, ClickHouseTraceBackend
from server.traces.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from server.traces.postgres import PostgresTraceBackend
from server.traces.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from server.traces.sqlite import SQLiteTraceBackend
from server.traces.writer import TraceWriter
from tests.trace_services import ClickHouseServer, PostgresServer

BASE_TIME = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
NASTY = "it's \\ a \"quote\"\n\ttab ' OR 1=1 -- é 日本 \U0001f600 %s ? $1 {x}"


async def fresh_postgres_dsn(server: PostgresServer) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.dsn(name)


BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.slow),
    pytest.param("clickhouse", marks=pytest.mark.slow),
]


@pytest.fixture(params=BACKENDS)
async def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """A factory of started backends on one fresh store; all are closed after the test."""
    kind: str = request.param
    made: list[TraceBackend] = []
    if kind == "sqlite":
        path = str(tmp_path / "traces.db")

        def build() -> TraceBackend:
            return SQLiteTraceBackend(path)
    elif kind == "postgres":
        dsn = await fresh_postgres_dsn(request.getfixturevalue("postgres_server"))

        def build() -> TraceBackend:
            return PostgresTraceBackend(dsn)
    else:
        url = request.getfixturevalue("clickhouse_server").url(f"t_{uuid.uuid4().hex[:12]}")

        def build() -> TraceBackend:
            return ClickHouseTraceBackend(url)

    async def make() -> TraceBackend:
        backend = build()
        await backend.start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


@pytest.fixture
async def backend(new_backend: object) -> TraceBackend:
    assert callable(new_backend)
    result: TraceBackend = await new_backend()
    return result


def trace(
    *,
    org: str = "org-1",
    step: str = "step-1",
    run: str = "run-1",
    agent: str = "agent-1",
    at: datetime = BASE_TIME,
    **fields: object,
) -> TraceRecord:
    record = TraceRecord(
        id=new_trace_id(), created_at=at, organization_id=org, step_id=step, run_id=run, agent_id=agent
    )
    for name, value in fields.items():
        setattr(record, name, value)
    return record


async def test_every_field_round_trips(backend: TraceBackend) -> None:
    record = TraceRecord(
        id=new_trace_id(),
        created_at=datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC),
        organization_id="org-x",
        user_id="user-x",
        step_id="step-x",
        agent_id="agent-x",
        agent_tags=["tag-a", NASTY],
        run_id="run-x",
        call_type="tool_generation",
        provider="openrouter",
        model="anthropic/claude-3.5-sonnet",
        model_endpoint_type="openai",
        is_byok=True,
        request_json='{"messages": [{"role": "user", "content": ' + repr(NASTY)[1:-1].join('""') + "}]}",
        response_json='{"choices": [{"message": {"content": "\\u00e9 \\n done"}}]}',
        error_type="",
        error_message=NASTY,
        prompt_tokens=1234,
        completion_tokens=56,
        total_tokens=1290,
        cached_tokens=1000,
        reasoning_tokens=7,
        latency_ms=812.5,
        time_to_first_token_ms=95.25,
        llm_config_json='{"model": "x", "temperature": 0.7}',
        cache_write_tokens=42,
        notes=["seed", "messages[].reasoning_content", NASTY],
    )
    await backend.write_batch(records=[record])
    assert await backend.get_latest(organization_id="org-x", step_id="step-x") == record
    assert await backend.list(query=TraceQuery(organization_id="org-x")) == [record]


async def test_failed_call_round_trips(backend: TraceBackend) -> None:
    record = trace(response_json="", error_type="UpstreamUnavailable", error_message="HTTP 503")
    await backend.write_batch(records=[record])
    assert await backend.get_latest(organization_id="org-1", step_id="step-1") == record


async def test_get_latest_is_the_newest_of_the_step_in_the_org(backend: TraceBackend) -> None:
    older = trace(at=BASE_TIME)
    newer = trace(at=BASE_TIME + timedelta(microseconds=1))  # sub-second ordering
    other_step = trace(step="step-2", at=BASE_TIME + timedelta(seconds=5))
    other_org = trace(org="org-2", at=BASE_TIME + timedelta(seconds=9))
    await backend.write_batch(records=[newer, other_org, older, other_step])
    assert await backend.get_latest(organization_id="org-1", step_id="step-1") == newer
    assert await backend.get_latest(organization_id="org-2", step_id="step-1") == other_org
    assert await backend.get_latest(organization_id="org-3", step_id="step-1") is None
    assert await backend.get_latest(organization_id="org-1", step_id="nope") is None


async def test_list_filters_newest_first(backend: TraceBackend) -> None:
    records = [
        trace(
            step=f"step-{i % 3}",
            run=f"run-{i % 2}",
            agent=f"agent-{i % 5}",
            at=BASE_TIME + timedelta(seconds=i),
        )
        for i in range(30)
    ]
    records.append(trace(org="org-2", at=BASE_TIME + timedelta(days=1)))
    await backend.write_batch(records=records)
    mine = sorted(records[:30], key=lambda r: r.created_at, reverse=True)

    async def ids(**filters: object) -> list[str]:
        query = TraceQuery(organization_id="org-1", limit=100, **filters)  # type: ignore[arg-type]
        return [r.id for r in await backend.list(query=query)]

    assert await ids() == [r.id for r in mine]
    assert await ids(step_id="step-1") == [r.id for r in mine if r.step_id == "step-1"]
    assert await ids(run_id="run-0") == [r.id for r in mine if r.run_id == "run-0"]
    assert await ids(agent_id="agent-4", run_id="run-0") == [
        r.id for r in mine if r.agent_id == "agent-4" and r.run_id == "run-0"
    ]
    start, end = BASE_TIME + timedelta(seconds=10), BASE_TIME + timedelta(seconds=20)
    assert await ids(start_time=start, end_time=end) == [r.id for r in mine if start <= r.created_at < end]
    assert await ids(step_id="missing") == []
    assert [r.id for r in await backend.list(query=TraceQuery(organization_id="org-2"))] == [records[30].id]
    assert await backend.list(query=TraceQuery(organization_id="org-3")) == []


async def test_keyset_pagination_walks_everything_once(backend: TraceBackend) -> None:
    # Ties on created_at (three traces per microsecond) are broken by id.
    records = [trace(at=BASE_TIME + timedelta(microseconds=i // 3)) for i in range(95)]
    await backend.write_batch(records=records[:50])
    await backend.write_batch(records=records[50:])
    expected = sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)
    seen: list[TraceRecord] = []
    before = None
    while True:
        page = await backend.list(query=TraceQuery(organization_id="org-1", limit=10, before=before))
        if not page:
            break
        assert len(page) <= 10
        seen.extend(page)
        before = (page[-1].created_at, page[-1].id)
    assert [r.id for r in seen] == [r.id for r in expected]


async def test_rewriting_a_batch_does_not_duplicate(backend: TraceBackend) -> None:
    # The writer retries a batch whose first attempt may have landed.
    records = [trace(at=BASE_TIME + timedelta(seconds=i)) for i in range(20)]
    await backend.write_batch(records=records)
    await backend.write_batch(records=records[5:15])
    listed = await backend.list(query=TraceQuery(organization_id="org-1", limit=100))
    assert sorted(r.id for r in listed) == sorted(r.id for r in records)


async def test_literals_are_escaped(backend: TraceBackend) -> None:
    record = trace(org=NASTY, step=NASTY, run=NASTY + "\\", agent="'")
    decoy = trace(org="org-1", step="step-1")
    await backend.write_batch(records=[record, decoy])
    assert await backend.get_latest(organization_id=NASTY, step_id=NASTY) == record
    query = TraceQuery(organization_id=NASTY, run_id=NASTY + "\\", agent_id="'")
    assert await backend.list(query=query) == [record]
    assert await backend.list(query=TraceQuery(organization_id="' OR '1'='1")) == []
    assert await backend.list(query=TraceQuery(organization_id="org-1", step_id=NASTY)) == []


async def test_reopening_keeps_the_data_and_the_schema(new_backend: object) -> None:
    assert callable(new_backend)
    first: TraceBackend = await new_backend()
    record = trace()
    await first.write_batch(records=[record])
    await first.close()
    second: TraceBackend = await new_backend()  # migrations run again: nothing to do
    assert await second.get_latest(organization_id="org-1", step_id="step-1") == record


async def test_the_writer_delivers_a_burst(backend: TraceBackend) -> None:
    writer = TraceWriter([backend], batch_size=200)
    await writer.start()
    records = [trace(step=f"s{i}", at=BASE_TIME + timedelta(microseconds=i)) for i in range(3000)]
    for record in records:
        writer.enqueue(record)
    await writer.close(timeout=60)
    assert writer.stats[0].written == 3000
    # close() closed the backend; reopen it to read.
    await backend.start()
    latest = await backend.list(query=TraceQuery(organization_id="org-1", limit=1))
    assert latest == [records[-1]]
    assert await backend.get_latest(organization_id="org-1", step_id="s0") == records[0]


async def test_fan_out_with_a_dead_backend(backend: TraceBackend) -> None:
    dead = PostgresTraceBackend("postgresql://gw:hunter2@127.0.0.1:1/nothing")
    writer = TraceWriter([backend, dead], start_timeout=0.5)
    await writer.start()
    records = [trace(step=f"s{i}") for i in range(200)]
    for record in records:
        writer.enqueue(record)
    await writer.close(timeout=2)
    assert writer.stats[0].written == 200
    assert writer.stats[1].dropped == 200
    await backend.start()
    assert len(await backend.list(query=TraceQuery(organization_id="org-1", limit=500))) == 200


# --- SQLite specifics -------------------------------------------------------------------


async def test_sqlite_schema_is_versioned_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    backend = SQLiteTraceBackend(str(path))
    await backend.start()
    await backend.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute(
            "SELECT version FROM schema_version WHERE component = 'provider_traces'"
        ).fetchone()[0]
        assert version == len(SQLITE_MIGRATIONS)
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(provider_traces)")}
        assert {
            "ix_provider_traces_org_step",
            "ix_provider_traces_run",
            "ix_provider_traces_created",
        } <= indexes
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM provider_traces WHERE organization_id = 'o'"
                " AND step_id = 's' ORDER BY created_at DESC, id DESC LIMIT 1"
            )
        )
        assert "ix_provider_traces_org_step" in plan and "TEMP B-TREE" not in plan


async def test_sqlite_throughput(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    backend = SQLiteTraceBackend(str(path))
    writer = TraceWriter([backend], queue_size=200_000, batch_size=500)
    await writer.start()
    request = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + "x" * 1500 + '"}]}'
    count = 60_000
    records = [
        trace(step=f"step-{i}", run=f"run-{i // 10}", request_json=request, response_json='{"choices": []}')
        for i in range(count)
    ]
    began = time.perf_counter()
    for record in records:
        writer.enqueue(record)
    await writer.flush(timeout=100)
    elapsed = time.perf_counter() - began
    await writer.close(timeout=10)
    print(
        f"\nSQLite trace writer: {count / elapsed:,.0f} traces/s"
        f" ({count} traces of ~1.6 kB in {elapsed:.2f}s)"
    )
    assert writer.stats[0].written == count and writer.stats[0].dropped == 0
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM provider_traces").fetchone()[0] == count


# --- PostgreSQL specifics ---------------------------------------------------------------


@pytest.mark.slow
async def test_postgres_table_and_indexes(postgres_server: PostgresServer) -> None:
    dsn = await fresh_postgres_dsn(postgres_server)
    backend = PostgresTraceBackend(dsn)
    await backend.start()
    await backend.close()
    conn = await asyncpg.connect(dsn)
    try:
        indexes = {r["indexname"] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'provider_traces'"
        )}  # fmt: skip
        version = await conn.fetchval(
            "SELECT version FROM schema_version WHERE component = 'provider_traces'"
        )
    finally:
        await conn.close()
    assert {"ix_provider_traces_step_id", "ix_provider_traces_org_step"} <= indexes
    assert version == len(POSTGRES_MIGRATIONS)


@pytest.mark.slow
async def test_postgres_nul_characters_do_not_poison_a_batch(postgres_server: PostgresServer) -> None:
    backend = PostgresTraceBackend(await fresh_postgres_dsn(postgres_server))
    await backend.start()
    try:
        record = trace(error_message="bad\x00byte", agent_tags=["a\x00"], notes=["n\x00"])
        await backend.write_batch(records=[record, trace(step="ok")])
        stored = await backend.get_latest(organization_id="org-1", step_id="step-1")
        assert stored is not None and stored.error_message == "bad\ufffdbyte"
        assert stored.notes == ["n\ufffd"]
        assert await backend.get_latest(organization_id="org-1", step_id="ok") is not None
    finally:
        await backend.close()


@pytest.mark.slow
async def test_postgres_errors_and_logs_carry_no_password(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    password = postgres_server.password
    wrong = postgres_server.dsn().replace(password, "not-the-password-x9")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ConnectionError) as failure:
            await PostgresTraceBackend(wrong).start()
        good = PostgresTraceBackend(postgres_server.dsn())
        await good.start()
        await good.close()
    assert "not-the-password-x9" not in str(failure.value)
    assert "***" in str(failure.value)
    assert all(password not in r.getMessage() for r in caplog.records)
    assert any("postgres trace store ready" in r.getMessage() for r in caplog.records)


# --- ClickHouse specifics ---------------------------------------------------------------


@pytest.mark.slow
async def test_clickhouse_table_and_version(clickhouse_server: ClickHouseServer) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    backend = ClickHouseTraceBackend(clickhouse_server.url(database))
    await backend.start()
    try:
        assert await backend.schema_version() == len(CLICKHOUSE_MIGRATIONS)
        assert await backend.migrate() == len(CLICKHOUSE_MIGRATIONS)  # idempotent
        engine = clickhouse_server.query(
            f"SELECT engine, sorting_key FROM system.tables WHERE database = '{database}'"
            " AND name = 'provider_traces' FORMAT TSV"
        )
        assert engine.startswith("ReplacingMergeTree")
    finally:
        await backend.close()


@pytest.mark.slow
async def test_clickhouse_errors_and_logs_carry_no_password(
    clickhouse_server: ClickHouseServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = clickhouse_server.url().replace(clickhouse_server.password, "not-the-password-x9")
    backend = ClickHouseTraceBackend(wrong)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ClickHouseError) as failure:
            await backend.start()
        await backend.close()
    assert failure.value.code in (192, 193, 516)
    assert "not-the-password-x9" not in str(failure.value) + repr(backend)
    assert all("not-the-password-x9" not in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_clickhouse_insert_errors_do_not_echo_the_rows(clickhouse_server: ClickHouseServer) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    backend = ClickHouseTraceBackend(clickhouse_server.url(database))
    await backend.start()
    try:
        clickhouse_server.query(f"ALTER TABLE {database}.provider_traces MODIFY COLUMN model UInt8")
        with pytest.raises(ClickHouseError) as failure:
            await backend.write_batch(records=[trace(model="secret-model-name-in-row")])
        assert "secret-model-name-in-row" not in str(failure.value)
        assert failure.value.code is not None
    finally:
        await backend.close()
