"""The gateway's SQLite file gets 16 KiB pages, whichever store creates it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from server.auth.store_sqlite import SqliteAuthStore
from server.traces.sqlite import SQLiteTraceBackend


def _page_size_and_mode(path: Path) -> tuple[int, str]:
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        return page_size, conn.execute("PRAGMA journal_mode").fetchone()[0]


async def test_created_by_the_key_store_first(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteAuthStore(path=str(path))
    await store.start()
    traces = SQLiteTraceBackend(str(path))
    await traces.start()
    await traces.close()
    await store.close()
    assert _page_size_and_mode(path) == (16384, "wal")


async def test_created_by_the_trace_store(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    traces = SQLiteTraceBackend(str(path))
    await traces.start()
    await traces.close()
    assert _page_size_and_mode(path) == (16384, "wal")


async def test_an_existing_file_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # made by an older version: 4 KiB pages, WAL
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE unrelated (x INTEGER)")
    traces = SQLiteTraceBackend(str(path))
    await traces.start()
    await traces.close()
    assert _page_size_and_mode(path) == (4096, "wal")
