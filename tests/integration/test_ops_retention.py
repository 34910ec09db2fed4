"""Issue 15, item 4: `LLMGW_TRACE_RETENTION` against the real stores.

SQLite and PostgreSQL: traces older than the retention are deleted in batches of `batch`, newer
ones stay, and a gateway started with a retention prunes its store by itself, in the background.
ClickHouse: the table gets a TTL, and a merge removes expired rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from server.traces.base import TraceBackend, TraceRecord, new_trace_id
from server.traces.clickhouse import ClickHouseTraceBackend
from server.traces.postgres import PostgresTraceBackend
from server.traces.retention import RetentionPruner
from server.traces.sqlite import SQLiteTraceBackend
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.trace_services import (
    ClickHouseServer,
    PostgresServer,
    fresh_clickhouse_database,
    fresh_postgres_database,
)

DAY = 86_400.0


def traces(count: int, *, age: timedelta, org: str = "acme") -> list[TraceRecord]:
    now = datetime.now(UTC)
    return [
        TraceRecord(
            id=new_trace_id(),
            created_at=now - age - timedelta(seconds=i),
            organization_id=org,
            step_id=f"s{i}",
        )
        for i in range(count)
    ]


class CountingBackend:
    """Records the batch sizes a real backend was asked to prune (the backend does the work)."""

    def __init__(self, backend: TraceBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self.calls: list[int] = []

    async def apply_retention(self, seconds: float) -> None:
        await self.backend.apply_retention(seconds)

    async def prune(self, *, before: datetime, limit: int) -> int:
        count = await self.backend.prune(before=before, limit=limit)
        self.calls.append(count)
        return count


async def prune_in_batches(backend: TraceBackend, old: int, new: int) -> CountingBackend:
    await backend.write_batch(records=traces(old, age=timedelta(days=40)))
    await backend.write_batch(records=traces(new, age=timedelta(days=29)))
    counting = CountingBackend(backend)
    pruner = RetentionPruner([counting], 30 * DAY, batch=1000)  # type: ignore[list-item]
    await pruner.run_once()
    assert pruner.deleted == {backend.name: old}
    return counting


async def test_sqlite_prunes_old_traces_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    backend = SQLiteTraceBackend(str(path))
    await backend.start()
    try:
        counting = await prune_in_batches(backend, 2500, 7)
    finally:
        await backend.close()
    assert counting.calls == [1000, 1000, 500]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM provider_traces").fetchone() == (7,)


@pytest.mark.slow
async def test_postgres_prunes_old_traces_in_batches_with_an_index(postgres_server: PostgresServer) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    backend = PostgresTraceBackend(dsn)
    await backend.start()
    try:
        await backend.apply_retention(30 * DAY)
        counting = await prune_in_batches(backend, 2100, 5)
    finally:
        await backend.close()
    assert counting.calls == [1000, 1000, 100]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT COUNT(*) FROM provider_traces") == 5
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_provider_traces_created'"
        )
    finally:
        await conn.close()
    assert index is not None and "(created_at)" in index


@pytest.mark.slow
async def test_clickhouse_expires_old_rows(clickhouse_server: ClickHouseServer) -> None:
    """A table TTL where the server has them (19.6+), else a DELETE mutation: either way the old
    rows go, by ClickHouse's own background work, and the new ones stay."""
    database = fresh_clickhouse_database()
    backend = ClickHouseTraceBackend(clickhouse_server.url(database))
    await backend.start()
    table = f"{database}.provider_traces"
    try:
        await backend.write_batch(
            records=traces(3, age=timedelta(days=40)) + traces(2, age=timedelta(hours=1))
        )
        pruner = RetentionPruner([backend], 30 * DAY)
        await pruner.start()
        await pruner.close()
        await pruner.run_once()
        await pruner.run_once()  # a second run while the first mutation may still run adds none
        end = time.monotonic() + 60
        while True:
            await asyncio.to_thread(clickhouse_server.query, f"OPTIMIZE TABLE {table} FINAL")
            count = (await asyncio.to_thread(clickhouse_server.query, f"SELECT count() FROM {table}")).strip()
            if count == "2" or time.monotonic() > end:
                break
            await asyncio.sleep(0.2)
        mutations = await asyncio.to_thread(
            clickhouse_server.query,
            f"SELECT count() FROM system.mutations WHERE database = '{database}'",
        )
    finally:
        await backend.close()
    assert count == "2"
    assert int(mutations.strip()) <= 1  # one mutation at most (none with a TTL)


def _count(path: str, where: str = "1") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM provider_traces WHERE {where}").fetchone()[0])


async def _wait(check: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
async def test_a_gateway_with_a_retention_prunes_its_store_by_itself(
    tmp_path: Path, upstream: FakeUpstream, request: pytest.FixtureRequest, kind: str
) -> None:
    overrides: dict[str, object] = {}
    if kind == "postgres":
        overrides = {
            "trace_backends": ("postgres",),
            "postgres_dsn": await fresh_postgres_database(request.getfixturevalue("postgres_server")),
        }
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), trace_retention=12 * 3600.0, **overrides
    )
    backend: TraceBackend = (
        SQLiteTraceBackend(settings.sqlite_path)
        if kind == "sqlite"
        else PostgresTraceBackend(settings.postgres_dsn)
    )
    await backend.start()
    try:
        await backend.write_batch(records=traces(1500, age=timedelta(hours=13)))
        await backend.write_batch(records=traces(4, age=timedelta(hours=11)))
    finally:
        await backend.close()
    async with running_gateway(settings) as gw:
        await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
        if kind == "sqlite":
            await _wait(lambda: _count(settings.sqlite_path) == 5)
            assert _count(settings.sqlite_path, "organization_id = 'acme'") == 4
        else:

            async def pg_count() -> int:
                conn = await asyncpg.connect(settings.postgres_dsn)
                try:
                    return int(await conn.fetchval("SELECT COUNT(*) FROM provider_traces"))
                finally:
                    await conn.close()

            end = time.monotonic() + 30
            while (count := await pg_count()) != 5 and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert count == 5
