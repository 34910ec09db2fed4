"""Issue 12 item 13, at the stores: a read bounded in bytes loads at most one trace past the
bound, on real SQLite, PostgreSQL and ClickHouse, and pages on from there without a gap."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.traces.base import TraceBackend, TraceQuery, TraceRecord, new_trace_id, record_size
from server.traces.clickhouse import ClickHouseTraceBackend
from server.traces.postgres import PostgresTraceBackend
from server.traces.sqlite import SQLiteTraceBackend
from tests.trace_services import fresh_postgres_database

AT = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.slow),
    pytest.param("clickhouse", marks=pytest.mark.slow),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TraceBackend]:
    store: TraceBackend
    if request.param == "sqlite":
        store = SQLiteTraceBackend(str(tmp_path / "t.db"))
    elif request.param == "postgres":
        store = PostgresTraceBackend(
            await fresh_postgres_database(request.getfixturevalue("postgres_server"))
        )
    else:
        server = request.getfixturevalue("clickhouse_server")
        store = ClickHouseTraceBackend(server.url(f"t_{uuid.uuid4().hex[:12]}"))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_a_read_stops_at_the_byte_bound(backend: TraceBackend) -> None:
    records = [
        TraceRecord(
            id=new_trace_id(),
            created_at=AT + timedelta(seconds=i),
            organization_id="org-1",
            step_id=f"s{i}",
            request_json="r" * 50_000,
            response_json="a" * 50_000,
        )
        for i in range(10)
    ]
    await backend.write_batch(records=records)
    size = record_size(records[0])
    newest_first = [r.id for r in reversed(records)]

    # 2.5 traces' worth: the third crosses the bound and is the last one read.
    query = TraceQuery(organization_id="org-1", limit=100, max_bytes=size * 5 // 2)
    assert [r.id for r in await backend.list(query=query)] == newest_first[:3]
    # One trace always comes back, however small the bound.
    tiny = TraceQuery(organization_id="org-1", limit=100, max_bytes=1)
    assert [r.id for r in await backend.list(query=tiny)] == newest_first[:1]
    # The count bound still applies, and no bound reads everything.
    few = TraceQuery(organization_id="org-1", limit=2, max_bytes=10**9)
    assert [r.id for r in await backend.list(query=few)] == newest_first[:2]
    assert [r.id for r in await backend.list(query=TraceQuery(organization_id="org-1"))] == newest_first
    # Paging on from the last trace read, by bytes, visits each trace once.
    seen: list[str] = []
    before: tuple[datetime, str] | None = None
    while True:
        page = await backend.list(
            query=TraceQuery(organization_id="org-1", limit=100, max_bytes=size * 2, before=before)
        )
        if not page:
            break
        seen.extend(r.id for r in page)
        before = (page[-1].created_at, page[-1].id)
    assert seen == newest_first
