"""The embedded trace store: one SQLite file in WAL mode, through aiosqlite.

Two connections: one writes (batches in one transaction each), one reads, so reads never wait
behind a batch. `created_at` is stored as integer microseconds since the epoch, which sorts and
compares exactly. Inserts are `INSERT OR IGNORE` on the trace id, so a batch the writer retries
after an ambiguous failure never duplicates a trace.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from typing import Any

import aiosqlite
import orjson

from server.traces.base import (
    TRACE_COLUMNS,
    TraceBackend,
    TraceQuery,
    TraceRecord,
    clamp_limit,
    from_micros,
    to_micros,
)

log = logging.getLogger(__name__)

COMPONENT = "provider_traces"

# Ordered; each entry brings the schema from version i to i + 1. Never edit a shipped entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE provider_traces (
            id TEXT NOT NULL PRIMARY KEY,
            created_at INTEGER NOT NULL,
            organization_id TEXT NOT NULL DEFAULT '',
            user_id TEXT NOT NULL DEFAULT '',
            step_id TEXT NOT NULL DEFAULT '',
            agent_id TEXT NOT NULL DEFAULT '',
            agent_tags TEXT NOT NULL DEFAULT '[]',
            run_id TEXT NOT NULL DEFAULT '',
            call_type TEXT NOT NULL DEFAULT 'agent_step',
            provider TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            model_endpoint_type TEXT NOT NULL DEFAULT '',
            is_byok INTEGER NOT NULL DEFAULT 0,
            request_json TEXT NOT NULL DEFAULT '',
            response_json TEXT NOT NULL DEFAULT '',
            error_type TEXT NOT NULL DEFAULT '',
            error_message TEXT NOT NULL DEFAULT '',
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL NOT NULL DEFAULT 0,
            time_to_first_token_ms REAL NOT NULL DEFAULT 0,
            llm_config_json TEXT NOT NULL DEFAULT ''
        )""",
        # GetProviderTrace: latest of a step in an organization.
        "CREATE INDEX ix_provider_traces_org_step ON provider_traces"
        " (organization_id, step_id, created_at, id)",
        "CREATE INDEX ix_provider_traces_run ON provider_traces (run_id, created_at)",
        # ListProviderTraces without a step or run filter, and time ranges.
        "CREATE INDEX ix_provider_traces_org_created ON provider_traces (organization_id, created_at, id)",
        "CREATE INDEX ix_provider_traces_created ON provider_traces (created_at)",
    ),
)

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # In WAL mode NORMAL loses at most the last transactions on power loss, never corrupts.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA cache_size=-32000",
    "PRAGMA wal_autocheckpoint=4000",
)

_COLUMN_LIST = ", ".join(TRACE_COLUMNS)
_INSERT = (
    f"INSERT OR IGNORE INTO provider_traces ({_COLUMN_LIST}) VALUES ({', '.join('?' for _ in TRACE_COLUMNS)})"
)
_SELECT = f"SELECT {_COLUMN_LIST} FROM provider_traces"
_CREATED = TRACE_COLUMNS.index("created_at")
_TAGS = TRACE_COLUMNS.index("agent_tags")
_BYOK = TRACE_COLUMNS.index("is_byok")


def _to_row(record: TraceRecord) -> tuple[Any, ...]:
    r = record
    return (
        r.id, to_micros(r.created_at), r.organization_id, r.user_id, r.step_id, r.agent_id,
        orjson.dumps(r.agent_tags).decode(), r.run_id, r.call_type, r.provider, r.model,
        r.model_endpoint_type, int(r.is_byok), r.request_json, r.response_json, r.error_type,
        r.error_message, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.cached_tokens,
        r.reasoning_tokens, r.latency_ms, r.time_to_first_token_ms, r.llm_config_json,
    )  # fmt: skip


def _from_row(row: Sequence[Any]) -> TraceRecord:
    values = list(row)
    values[_CREATED] = from_micros(values[_CREATED])
    values[_TAGS] = orjson.loads(values[_TAGS])
    values[_BYOK] = bool(values[_BYOK])
    return TraceRecord(*values)


class SQLiteTraceBackend(TraceBackend):
    """Traces in a local SQLite file (the default backend)."""

    name = "sqlite"
    readable = True
    # Every transaction rewrites the index pages it touches into the WAL: fewer, larger
    # transactions write far less (about 28,000 traces/s at 500 a batch, 40,000 at 2,000).
    batch_size = 2000

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            for pragma in PRAGMAS:
                await conn.execute(pragma)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def start(self) -> None:
        if self._writer is not None:
            return
        writer = await self._connect()
        try:
            await migrate(writer)
            self._reader = await self._connect()
        except BaseException:
            await writer.close()
            raise
        self._writer = writer
        log.info("sqlite trace store ready at %s", self.path)

    async def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        if self._writer is None:
            raise RuntimeError("sqlite trace store is not started")
        if not records:
            return
        rows = [_to_row(r) for r in records]
        conn = self._writer
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.executemany(_INSERT, rows)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    async def get_latest(self, *, organization_id: str, step_id: str) -> TraceRecord | None:
        rows = await self._fetch(
            f"{_SELECT} WHERE organization_id = ? AND step_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
            (organization_id, step_id),
        )
        return _from_row(rows[0]) if rows else None

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        where = ["organization_id = ?"]
        params: list[Any] = [query.organization_id]
        for column in ("step_id", "run_id", "agent_id"):
            value = getattr(query, column)
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if query.start_time is not None:
            where.append("created_at >= ?")
            params.append(to_micros(query.start_time))
        if query.end_time is not None:
            where.append("created_at < ?")
            params.append(to_micros(query.end_time))
        if query.before is not None:
            where.append("(created_at, id) < (?, ?)")
            params.extend((to_micros(query.before[0]), query.before[1]))
        params.append(clamp_limit(query.limit))
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?"
        return [_from_row(row) for row in await self._fetch(sql, params)]

    async def _fetch(self, sql: str, params: Sequence[Any]) -> builtins.list[Any]:
        if self._reader is None:
            raise RuntimeError("sqlite trace store is not started")
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())


async def _rollback(conn: aiosqlite.Connection) -> None:
    try:
        await conn.execute("ROLLBACK")
    except Exception:  # no transaction left to roll back
        pass


async def schema_version(conn: aiosqlite.Connection) -> int:
    """The applied version of the trace schema (0 before any migration)."""
    async with conn.execute("SELECT version FROM schema_version WHERE component = ?", (COMPONENT,)) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection) -> int:
    """Apply the pending migrations, each in its own transaction; returns the new version.

    `schema_version` has one row per component so other stores may share the file.
    BEGIN IMMEDIATE serializes concurrent starters (several worker processes).
    """
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )
    while True:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version = await schema_version(conn)
            if version >= len(MIGRATIONS):
                await conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (?, ?)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (COMPONENT, version + 1),
            )
            await conn.execute("COMMIT")
            log.info("sqlite trace schema migrated to version %d", version + 1)
        except BaseException:
            await _rollback(conn)
            raise
