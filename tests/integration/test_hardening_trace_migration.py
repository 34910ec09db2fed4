"""Issue 12 item 2: stores made before the `owner` column migrate, and their old rows are
admin-only (nobody can say whose they were). Real SQLite, PostgreSQL and ClickHouse."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from server.traces import clickhouse, postgres, sqlite
from server.traces.base import TraceBackend, TraceQuery, TraceRecord, new_trace_id
from tests.trace_services import ClickHouseServer, PostgresServer, fresh_postgres_database

AT = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
LEGACY_ID = "provider_trace-legacy"


async def check_legacy_rows_are_admin_only(backend: TraceBackend) -> None:
    await backend.start()
    try:
        new = TraceRecord(
            id=new_trace_id(), created_at=AT, organization_id="org-1", step_id="s", owner="user:alice"
        )
        await backend.write_batch(records=[new])
        everything = await backend.list(query=TraceQuery(organization_id="org-1"))
        assert {r.id for r in everything} == {LEGACY_ID, new.id}
        legacy = next(r for r in everything if r.id == LEGACY_ID)
        assert legacy.owner == ""
        assert (legacy.cache_write_tokens, legacy.notes) == (0, [])  # columns of later migrations
        alice = await backend.list(query=TraceQuery(organization_id="org-1", owner="user:alice"))
        assert [r.id for r in alice] == [new.id]
        # The legacy row's own user (what the request said) gives no access either.
        bob = await backend.list(query=TraceQuery(organization_id="org-1", owner="user:bob"))
        assert bob == []
        latest = await backend.get_latest(organization_id="org-1", step_id="legacy", owner="user:bob")
        assert latest is None
        admin = await backend.get_latest(organization_id="org-1", step_id="legacy")
        assert admin is not None and admin.id == LEGACY_ID
    finally:
        await backend.close()


async def test_sqlite_store_of_version_1_migrates(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    conn = sqlite.sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    for statement in sqlite.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES ('provider_traces', 1)")
    conn.execute(
        "INSERT INTO provider_traces (id, created_at, organization_id, user_id, step_id)"
        " VALUES (?, ?, 'org-1', 'bob', 'legacy')",
        (LEGACY_ID, 1_700_000_000_000_000),
    )
    conn.close()
    await check_legacy_rows_are_admin_only(sqlite.SQLiteTraceBackend(str(path)))
    with sqlite3.connect(path) as check:
        assert sqlite.schema_version(check) == len(sqlite.MIGRATIONS) == 7  # notes, indexes, routes, cost


@pytest.mark.slow
async def test_postgres_store_of_version_1_migrates(postgres_server: PostgresServer) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_version (component text PRIMARY KEY, version integer NOT NULL)"
        )
        for statement in postgres.MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_version VALUES ('provider_traces', 1)")
        await conn.execute(
            "INSERT INTO provider_traces (id, created_at, organization_id, user_id, step_id)"
            " VALUES ($1, $2, 'org-1', 'bob', 'legacy')",
            LEGACY_ID,
            datetime(2023, 11, 14, tzinfo=UTC),
        )
    finally:
        await conn.close()
    await check_legacy_rows_are_admin_only(postgres.PostgresTraceBackend(dsn))


@pytest.mark.slow
async def test_clickhouse_store_of_version_1_migrates(clickhouse_server: ClickHouseServer) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    db = clickhouse.quote_identifier(database)
    clickhouse_server.query(f"CREATE DATABASE {db}")
    clickhouse_server.query(clickhouse._SCHEMA_VERSION_TABLE.format(database=db))
    for statement in clickhouse.MIGRATIONS[0]:
        clickhouse_server.query(statement.format(database=db))
    clickhouse_server.query(
        f"INSERT INTO {db}.schema_version (component, version, applied_at)"
        " VALUES ('provider_traces', 1, now())"
    )
    clickhouse_server.query(
        f"INSERT INTO {db}.provider_traces (id, created_at, created_at_us, organization_id, user_id, step_id)"
        f" VALUES ('{LEGACY_ID}', 1700000000, 1700000000000000, 'org-1', 'bob', 'legacy')"
    )
    await check_legacy_rows_are_admin_only(clickhouse.ClickHouseTraceBackend(clickhouse_server.url(database)))
