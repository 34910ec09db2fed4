"""The SQLite trace store's WAL stays bounded however its batches come.

A PASSIVE checkpoint never rewinds the WAL; the writer rewinds it only when a checkpoint had
copied every frame, which a writer committing while the checkpoint ran prevents. One-trace
batches back to back (what the writer's thread does under a steady moderate rate, ~10 pages of
16 KiB each) grew the WAL without end: 1,500 of them left ~230 MiB of WAL. The checkpointer
now empties it (TRUNCATE, under the write lock) once a checkpoint leaves more than
`_WAL_RESET_BYTES` in it.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.traces import sqlite as sqlite_store
from server.traces.base import TraceRecord, new_trace_id
from server.traces.sqlite import SQLiteTraceBackend


def _record(i: int) -> TraceRecord:
    return TraceRecord(
        id=new_trace_id(),
        created_at=datetime.now(UTC),
        organization_id="org",
        step_id=f"step-{i}",
        request_json="x" * 1700,
        response_json="y" * 600,
        provider="openai",
        model="gpt-4o-mini",
    )


async def test_one_trace_batches_back_to_back_keep_the_wal_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_WAL_RESET_BYTES", 4 * 1024 * 1024, raising=False)
    path = tmp_path / "traces.db"
    store = SQLiteTraceBackend(str(path))
    await store.start()
    wal = Path(f"{path}-wal")
    batches = 3000
    peak = last = 0
    emptied = 0
    try:
        for i in range(batches):
            store.write_batch_sync([_record(i)])
            size = wal.stat().st_size
            emptied += size < last  # the file only shrinks when a TRUNCATE checkpoint empties it
            peak, last = max(peak, size), size
    finally:
        await store.close()
    # Every trace is there (a checkpoint never loses one).
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM provider_traces").fetchone()[0] == batches
    # ~155 KiB of WAL per one-trace batch: unbounded, the WAL only grew (3,000 batches: ~460 MiB).
    # Now it is emptied again and again; its peak is the limit plus what the writer adds while a
    # checkpoint runs (~100 MiB/s back to back: 85-148 MiB seen on a loaded machine).
    assert emptied >= 2, f"the WAL was emptied {emptied} times; it reached {peak / 2**20:.0f} MiB"
    assert peak < 256 * 1024 * 1024, f"the WAL reached {peak / 2**20:.0f} MiB"


async def test_a_checkpoint_runs_after_many_small_batches_not_only_after_many_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints: list[str] = []
    path = tmp_path / "traces.db"
    store = SQLiteTraceBackend(str(path))
    woken = store._checkpoint_wake

    class Recording:
        def set(self) -> None:
            checkpoints.append("woken")
            woken.set()

        def __getattr__(self, name: str) -> object:
            return getattr(woken, name)

    await store.start()
    try:
        monkeypatch.setattr(store, "_checkpoint_wake", Recording())
        for i in range(sqlite_store._CHECKPOINT_COMMITS * 3):
            store.write_batch_sync([_record(i)])
    finally:
        monkeypatch.setattr(store, "_checkpoint_wake", woken)
        await store.close()
    # 192 traces, far below the 2,000 rows that alone woke the checkpointer before.
    assert len(checkpoints) == 3


async def test_a_retention_sweep_counts_towards_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a backlog rewrites pages as inserting does: its batches wake the checkpointer too."""
    path = tmp_path / "traces.db"
    store = SQLiteTraceBackend(str(path))
    await store.start()
    woken: list[int] = []
    try:
        store.write_batch_sync([_record(i) for i in range(100)])
        store._unchecked = store._unchecked_commits = 0
        monkeypatch.setattr(store._checkpoint_wake, "set", lambda: woken.append(1))
        for _ in range(sqlite_store._CHECKPOINT_COMMITS):
            assert await store.prune(before=datetime.now(UTC), limit=1) == 1
        assert await store.prune(before=datetime.now(UTC), limit=1) == 1
    finally:
        monkeypatch.undo()
        await store.close()
    assert woken == [1]


async def test_a_reader_holding_a_snapshot_never_stalls_the_writer_behind_a_truncate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TRUNCATE checkpoint runs under the write lock and waits for readers: a long read (a
    GetUsage over a big table, a ListProviderTraces stepping row by row on a busy loop) kept the
    trace writer waiting the whole busy timeout (10 s: ~30,000 traces at saturation, three times
    the queue). It waits for readers only briefly now, and empties the WAL once they are done."""
    monkeypatch.setattr(sqlite_store, "_WAL_RESET_BYTES", 1024 * 1024)
    path = tmp_path / "traces.db"
    wal = Path(f"{path}-wal")
    store = SQLiteTraceBackend(str(path))
    await store.start()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        store.write_batch_sync([_record(i) for i in range(10)])
        reader.execute("BEGIN")
        reader.execute("SELECT id FROM provider_traces").fetchone()  # a read in progress
        worst = 0.0
        for i in range(sqlite_store._CHECKPOINT_COMMITS * 3):  # three checkpoints, each due a TRUNCATE
            started = time.perf_counter()
            store.write_batch_sync([_record(i)])
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.005)  # the checkpointer's turn
        assert worst < 1.0, f"a one-trace batch waited {worst:.1f} s behind the checkpoint"
        reader.execute("COMMIT")  # the read is over: the next checkpoint empties the WAL
        for i in range(sqlite_store._CHECKPOINT_COMMITS):
            store.write_batch_sync([_record(i)])
        deadline = time.monotonic() + 10
        while wal.stat().st_size > 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wal.stat().st_size <= 1024 * 1024, f"the WAL stayed at {wal.stat().st_size / 2**20:.0f} MiB"
    finally:
        reader.close()
        await store.close()


def _big(i: int, chars: int) -> TraceRecord:
    record = _record(i)
    record.request_json = "A" * chars  # a base64 image, say
    return record


async def test_a_checkpoint_runs_after_many_bytes_not_only_after_many_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big traces (1 MiB requests) come 16 to a batch (the writer's 16 MiB batch_bytes): 64 commits
    were ~1.1 GiB of WAL before the first checkpoint. Their bytes wake the checkpointer too."""
    checkpoints: list[str] = []
    path = tmp_path / "traces.db"
    store = SQLiteTraceBackend(str(path))
    woken = store._checkpoint_wake

    class Recording:
        def set(self) -> None:
            checkpoints.append("woken")
            woken.set()

        def __getattr__(self, name: str) -> object:
            return getattr(woken, name)

    await store.start()
    per_batch = 4 * 1024 * 1024
    batches = 3 * sqlite_store._CHECKPOINT_BYTES // per_batch
    assert batches < sqlite_store._CHECKPOINT_COMMITS and 4 * batches < sqlite_store._CHECKPOINT_ROWS
    try:
        monkeypatch.setattr(store, "_checkpoint_wake", Recording())
        for i in range(batches):
            store.write_batch_sync([_big(4 * i + k, per_batch // 4) for k in range(4)])
    finally:
        monkeypatch.setattr(store, "_checkpoint_wake", woken)
        await store.close()
    assert len(checkpoints) == 3


async def test_big_traces_keep_the_wal_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_WAL_RESET_BYTES", 4 * 1024 * 1024, raising=False)
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_BYTES", 4 * 1024 * 1024, raising=False)
    path = tmp_path / "traces.db"
    wal = Path(f"{path}-wal")
    store = SQLiteTraceBackend(str(path))
    await store.start()
    peak = 0
    try:
        for i in range(48):  # 48 batches of 1 MiB: fewer than 64 commits, fewer than 2,000 traces
            store.write_batch_sync([_big(4 * i + k, 256 * 1024) for k in range(4)])
            time.sleep(0.01)  # the checkpointer's turn
            peak = max(peak, wal.stat().st_size)
    finally:
        await store.close()
    assert peak < 24 * 1024 * 1024, f"the WAL reached {peak / 2**20:.0f} MiB"


async def test_close_while_a_truncate_waits_for_a_reader_is_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() joins the checkpointer: behind a TRUNCATE waiting 10 s for a reader it outlived the
    trace writer's 5 s for a backend's close ("failed to close" at every such shutdown)."""
    monkeypatch.setattr(sqlite_store, "_WAL_RESET_BYTES", 1024 * 1024)
    path = tmp_path / "traces.db"
    store = SQLiteTraceBackend(str(path))
    await store.start()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        store.write_batch_sync([_record(0)])
        reader.execute("BEGIN")
        reader.execute("SELECT id FROM provider_traces").fetchone()
        for i in range(sqlite_store._CHECKPOINT_COMMITS):  # wakes the checkpointer: a TRUNCATE is due
            store.write_batch_sync([_record(i)])
        time.sleep(0.05)  # it is waiting for the reader
        started = time.perf_counter()
        await store.close()
        assert time.perf_counter() - started < 2.0
    finally:
        reader.close()
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM provider_traces").fetchone()[0] == 65
