"""Issue 12 items 9 and 13 (disk full): trace lanes bounded in bytes, poison records, a full disk.

Real stores only: SQLite files (held by a real lock, or on a real 1 MiB tmpfs), PostgreSQL at a
closed port (a dead server) or a real one, ClickHouse (a real one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.app import GatewayServer
from server.config import load_settings
from server.traces.base import TraceBackend, TraceQuery, TraceRecord, new_trace_id
from server.traces.clickhouse import ClickHouseTraceBackend
from server.traces.postgres import PostgresTraceBackend
from server.traces.sqlite import SQLiteTraceBackend
from server.traces.writer import TraceWriter, WriterRetry
from tests.gateway_harness import make_settings, running_gateway
from tests.trace_services import (
    ClickHouseServer,
    PostgresServer,
    free_port,
    fresh_clickhouse_database,
    fresh_postgres_database,
)

AT = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
FAST = WriterRetry(initial_delay=0.01, multiplier=2.0, max_delay=0.05, jitter=0.0, max_attempts=3)
BIG = 100_000  # characters of request JSON per trace


def record(i: int, *, size: int = BIG, **fields: object) -> TraceRecord:
    return TraceRecord(
        id=new_trace_id(),
        created_at=AT + timedelta(microseconds=i),
        organization_id="org-1",
        step_id=f"step-{i}",
        request_json="x" * size,
        **fields,  # type: ignore[arg-type]
    )


# --- item 9: bounded in bytes ------------------------------------------------------------------


async def test_sqlite_lane_is_bounded_in_bytes_while_the_file_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    backend = SQLiteTraceBackend(str(path))
    writer = TraceWriter([backend], queue_bytes=1_000_000, batch_bytes=500_000, retry=FAST, write_timeout=30)
    await writer.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA busy_timeout=0")
    blocker.execute("BEGIN IMMEDIATE")  # the writer's transactions wait for this lock
    try:
        records = [record(i) for i in range(100)]
        for r in records:
            writer.enqueue(r)
        stats = writer.stats_for("sqlite")
        # At most ~1 MB queued plus one batch of at most ~0.5 MB in flight, of 10 MB enqueued.
        assert stats.queued <= 10 + 5
        assert stats.dropped >= 100 - 15
        assert stats.queued_bytes <= 1_000_000 + 500_000 + 2 * BIG
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await writer.flush(timeout=60)
    stats = writer.stats_for("sqlite")
    assert stats.written + stats.dropped == 100
    stored = await backend.list(query=TraceQuery(organization_id="org-1", limit=1000))
    assert len(stored) == stats.written
    assert records[-1].id in {r.id for r in stored}  # the newest are kept, the oldest dropped
    await writer.close()


async def test_postgres_lane_is_bounded_in_bytes_while_the_server_is_down() -> None:
    dead = PostgresTraceBackend(f"postgresql://u:pw@127.0.0.1:{free_port()}/db")
    writer = TraceWriter([dead], queue_bytes=1_000_000, retry=FAST, start_timeout=0.01)
    await writer.start()
    for i in range(100):
        writer.enqueue(record(i))
    stats = writer.stats_for("postgres")
    assert stats.written == 0
    assert stats.queued <= 10
    assert stats.dropped == 100 - stats.queued
    assert stats.queued_bytes <= 1_000_000
    await writer.close(timeout=0.2)
    assert writer.stats_for("postgres").dropped == 100


async def test_a_record_larger_than_the_bound_is_still_written(tmp_path: Path) -> None:
    backend = SQLiteTraceBackend(str(tmp_path / "traces.db"))
    writer = TraceWriter([backend], queue_bytes=10_000, batch_bytes=10_000)
    await writer.start()
    writer.enqueue(record(0, size=50_000))
    await writer.flush(timeout=30)
    assert writer.stats_for("sqlite").written == 1
    await writer.close()


# --- item 13: a record a backend rejects does not take the others with it ------------------------


async def check_poison_is_dropped_alone(
    backend: TraceBackend, poison: TraceRecord, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    writer = TraceWriter([backend], retry=FAST, warn_interval=0)
    good = [record(i, size=100) for i in range(10)]
    # Queued before the lane starts: one batch holds all eleven.
    for r in good[:5]:
        writer.enqueue(r)
    writer.enqueue(poison)
    for r in good[5:]:
        writer.enqueue(r)
    try:
        with caplog.at_level(logging.WARNING):
            await writer.start()
            await writer.flush(timeout=30)
        stats = writer.stats_for(backend.name)
        assert (stats.written, stats.dropped) == (10, 1)
        stored = await backend.list(query=TraceQuery(organization_id="org-1", limit=100))
        assert {r.id for r in stored} == {r.id for r in good}
        assert any("rejected" in m and reason in m for m in caplog.messages), caplog.messages
    finally:
        await writer.close()


def surrogate_record() -> TraceRecord:
    # A lone surrogate: a Python str no UTF-8 store can encode (an exception's text may hold one).
    return record(99, size=100, error_message="broken \udcff text")


async def test_sqlite_poison_record_is_dropped_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_poison_is_dropped_alone(
        SQLiteTraceBackend(str(tmp_path / "t.db")), surrogate_record(), caplog, "UnicodeEncodeError"
    )


@pytest.mark.slow
async def test_postgres_poison_record_is_dropped_alone(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A caller's 10 KB random step_id exceeds PostgreSQL's btree entry limit (2704 bytes): the
    # server refuses that row, every time.
    poison = record(99, size=100)
    poison.step_id = secrets.token_hex(5000)
    await check_poison_is_dropped_alone(
        PostgresTraceBackend(await fresh_postgres_database(postgres_server)),
        poison,
        caplog,
        "ProgramLimitExceededError",
    )


@pytest.mark.slow
async def test_clickhouse_poison_record_is_dropped_alone(
    clickhouse_server: ClickHouseServer, caplog: pytest.LogCaptureFixture
) -> None:
    await check_poison_is_dropped_alone(
        ClickHouseTraceBackend(clickhouse_server.url(fresh_clickhouse_database())),
        surrogate_record(),
        caplog,
        "surrogates not allowed",
    )


def test_postgres_rejects_bad_data_but_retries_a_dead_server() -> None:
    backend = PostgresTraceBackend("postgresql://u:pw@127.0.0.1:1/db")
    assert backend.rejects(UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"))
    assert not backend.rejects(ConnectionRefusedError("refused"))


# --- item 13: disk full --------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs); skipped where mounting needs privileges we lack."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_drops_in_bounded_batches_with_the_reason(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SQLiteTraceBackend(str(tiny_disk / "traces.db"))
    writer = TraceWriter([backend], retry=FAST, batch_bytes=200_000, warn_interval=0)
    await writer.start()
    with caplog.at_level(logging.WARNING):
        for i in range(60):  # 3 MB into a 1 MiB disk
            writer.enqueue(record(i, size=50_000))
        await writer.flush(timeout=60)
        stats = writer.stats_for("sqlite")
        assert stats.written + stats.dropped == 60
        assert 0 < stats.dropped
        # Every failed batch was bounded (<= 200 kB: 4 traces of 50 kB), never the whole backlog.
        sizes = [int(m.split("batch of ")[1].split()[0]) for m in caplog.messages if "batch of " in m]
        assert sizes and max(sizes) <= 4
        assert any("database or disk is full" in m and "dropping" in m for m in caplog.messages)
        await writer.close(timeout=5)
    final = writer.stats_for("sqlite")
    assert final.written + final.dropped == 60


async def test_disk_full_at_shutdown_says_why_the_traces_are_lost(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SQLiteTraceBackend(str(tiny_disk / "traces.db"))
    slow_retry = WriterRetry(initial_delay=30.0, max_delay=30.0, jitter=0.0, max_attempts=100)
    writer = TraceWriter([backend], retry=slow_retry)
    await writer.start()
    with caplog.at_level(logging.WARNING):
        for i in range(40):  # 2 MB into a 1 MiB disk: the lane is stuck retrying at shutdown
            writer.enqueue(record(i, size=50_000))
        await eventually_failing(writer)
        await writer.close(timeout=0.5)
    final = writer.stats_for("sqlite")
    assert final.written + final.dropped == 40 and final.dropped > 0
    assert any("dropped at shutdown" in m and "database or disk is full" in m for m in caplog.messages), (
        caplog.messages
    )


async def eventually_failing(writer: TraceWriter) -> None:
    """Until the lane's first write failed (bounded wait)."""
    for _ in range(500):
        if writer.stats_for("sqlite").failed_batches:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the full disk never failed a write")


async def test_the_queue_byte_bound_is_a_setting(tmp_path: Path) -> None:
    assert load_settings(environ={}).trace_queue_bytes == 256 * 1024 * 1024
    settings = load_settings(
        environ={"LLMGW_TRACE_QUEUE_BYTES": "123456", "LLMGW_SQLITE_PATH": str(tmp_path / "g.db")}
    )
    assert settings.trace_queue_bytes == 123456
    with pytest.raises(ValueError, match="LLMGW_TRACE_QUEUE_BYTES"):
        load_settings(environ={"LLMGW_TRACE_QUEUE_BYTES": "0"})
    server = GatewayServer(make_settings(tmp_path, trace_queue_bytes=123456))
    async with running_gateway(make_settings(tmp_path), server):
        assert server._running is not None
        assert server._running.writer.queue_bytes == 123456
