"""The embedded trace store: one SQLite file in WAL mode.

Two connections: one writes (batches in one transaction each), one reads, so reads never wait
behind a batch. The writing one is a plain `sqlite3` connection used from the trace writer's
own thread (`threaded`): building the rows and inserting them never runs on, nor waits for, the
event loop. A batch is one statement per chunk of up to 256 rows (a multi-row VALUES) rather
than `executemany`, which steps, and releases and re-takes the GIL, once per row (about 10%
faster alone). The reading one is aiosqlite, on the loop, as before.

Checkpoints (copying the WAL into the database file, with an fsync) take seconds on a busy disk;
run on commit, as SQLite's automatic checkpoint does, they stall the writer that long and the
trace queue overflows at saturation. So the writing connection turns automatic checkpoints off
and a third connection, on its own thread, runs PASSIVE checkpoints (which never block the
writer) after every `_CHECKPOINT_ROWS` traces, `_CHECKPOINT_COMMITS` batches or
`_CHECKPOINT_BYTES` of request and answer text written (big traces, 1 MiB base64 images, come
16 to a batch: 64 of those batches were ~1.1 GiB of WAL before the first checkpoint).

A PASSIVE checkpoint copies the WAL into the database but never rewinds it: the next writer
starts the WAL over only if the checkpoint had copied every frame, which a writer busy while it
ran prevents, so under steady writes the WAL file grew without end (6,000 one-trace batches left
a 938 MiB WAL beside a 13 MiB database; one-trace batches are what a quiet gateway writes, and
each rewrites ~10 pages of 16 KiB). So when a checkpoint leaves more than `_WAL_RESET_BYTES` in
the WAL, the checkpointer runs a TRUNCATE checkpoint under the write lock: it waits for the
batch in flight, holds the next one back while it copies what the PASSIVE one left (what came
meanwhile) and waits for readers, and empties the file. It waits for readers (and for another
worker's writer) at most `_TRUNCATE_WAIT_MS`, not the busy timeout: the trace writer waits behind
it, and a long read (a GetUsage over a big table) held it 10 s, ~30,000 traces at saturation. A
TRUNCATE that gave up leaves the WAL as it was; the next checkpoint tries again.

`created_at` is stored as integer microseconds since the epoch, which sorts and
compares exactly. Inserts are `INSERT OR IGNORE` on the trace id, so a batch the writer retries
after an ambiguous failure never duplicates a trace.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiosqlite
import orjson

from server.sqlite_file import (
    NEW_FILE_PRAGMAS,
    READ_SCHEMA_VERSION,
    SCHEMA_VERSION_TABLE,
    WRITE_SCHEMA_VERSION,
)
from server.traces.base import (
    MAX_POINTS,
    POINT_COLUMNS,
    TRACE_COLUMNS,
    TraceBackend,
    TracePoint,
    TraceQuery,
    TraceRecord,
    clamp_limit,
    from_micros,
    record_bytes,
    to_micros,
)
from server.traces.usage import SUMMED, UsageQuery, UsageTotals, totals_from

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
    (
        # Who may read a trace besides admins (issue 12): rows written before stay admin-only.
        "ALTER TABLE provider_traces ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX ix_provider_traces_org_owner_created ON provider_traces"
        " (organization_id, owner, created_at, id)",
    ),
    # Usage.cache_write_tokens (issue 13): rows written before report 0.
    ("ALTER TABLE provider_traces ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0",),
    # ProviderTrace.notes (issue 13), a JSON list like agent_tags: rows written before have none.
    ("ALTER TABLE provider_traces ADD COLUMN notes TEXT NOT NULL DEFAULT '[]'",),
    # The console's trace list filtered by model or by error reason, newest first (issue 18).
    (
        "CREATE INDEX ix_provider_traces_org_model_created ON provider_traces"
        " (organization_id, model, created_at, id)",
        "CREATE INDEX ix_provider_traces_org_error_created ON provider_traces"
        " (organization_id, error_type, created_at, id)",
    ),
    # Routes (issue 16): rows written before were direct calls.
    (
        "ALTER TABLE provider_traces ADD COLUMN route TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE provider_traces ADD COLUMN deployment TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE provider_traces ADD COLUMN attempts_json TEXT NOT NULL DEFAULT ''",
    ),
    # Cost and key of each call (issue 17): TEXT, an exact decimal string; NULL is unpriced.
    (
        "ALTER TABLE provider_traces ADD COLUMN cost_usd TEXT",
        "ALTER TABLE provider_traces ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
    ),
)

PRAGMAS = (
    *NEW_FILE_PRAGMAS,  # page size, then WAL: in that order (see server/sqlite_file.py)
    # In WAL mode NORMAL loses at most the last transactions on power loss, never corrupts.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA cache_size=-32000",
    "PRAGMA wal_autocheckpoint=4000",
)

_COLUMN_LIST = ", ".join(TRACE_COLUMNS)
_SELECT = f"SELECT {_COLUMN_LIST} FROM provider_traces"
# Rows per INSERT statement: a power of two at most, so a batch uses at most 9 distinct
# statements, all in the connection's statement cache (25 columns x 256 rows = 6,400 parameters,
# far below SQLite's limit of 32,766).
_CHUNK = 256
_ROW_PLACEHOLDERS = f"({', '.join('?' for _ in TRACE_COLUMNS)})"


def _insert_rows(count: int) -> str:
    """The INSERT of `count` rows at once."""
    return f"INSERT OR IGNORE INTO provider_traces ({_COLUMN_LIST}) VALUES " + ", ".join(
        [_ROW_PLACEHOLDERS] * count
    )


_INSERTS = {1 << i: _insert_rows(1 << i) for i in range(_CHUNK.bit_length())}
# Traces written between two checkpoints (a 2,000-trace batch is about 3,000 WAL pages), or
# batches: a one-trace batch writes ~10 pages, so 2,000 of them would be ~300 MiB of WAL.
_CHECKPOINT_ROWS = 2000
_CHECKPOINT_COMMITS = 64
# Or characters of request and answer text (what big traces write: their pages, one for one).
_CHECKPOINT_BYTES = 32 * 1024 * 1024
# What a checkpoint may leave in the WAL before the checkpointer empties it (TRUNCATE).
_WAL_RESET_BYTES = 64 * 1024 * 1024
# How long that TRUNCATE, holding the write lock, waits for readers and other writers (the
# checkpointing connection's busy timeout; a PASSIVE checkpoint never waits).
_TRUNCATE_WAIT_MS = 100
_CREATED = TRACE_COLUMNS.index("created_at")
_TAGS = TRACE_COLUMNS.index("agent_tags")
_BYOK = TRACE_COLUMNS.index("is_byok")
_NOTES = TRACE_COLUMNS.index("notes")


_USAGE_GROUPS = {
    "day": "strftime('%Y-%m-%d', created_at / 1000000, 'unixepoch')",
    "model": "model",
    "key_id": "key_id",
    "user_id": "user_id",
}
# SQLite has no exact decimal: the cost text ("12.0034", at most 12 fractional digits) is summed
# as three integer parts (dollars, then two groups of six fractional digits), none of which can
# overflow a 64-bit SUM in any real number of rows.
_FRACTION = "substr(substr(cost_usd, instr(cost_usd, '.') + 1) || '000000000000', 1, 12)"
_COST_PARTS = (
    "SUM(CASE WHEN instr(cost_usd, '.') > 0"
    " THEN CAST(substr(cost_usd, 1, instr(cost_usd, '.') - 1) AS INTEGER)"
    " ELSE CAST(cost_usd AS INTEGER) END),"
    f" SUM(CASE WHEN instr(cost_usd, '.') > 0 THEN CAST(substr({_FRACTION}, 1, 6) AS INTEGER) ELSE 0 END),"
    f" SUM(CASE WHEN instr(cost_usd, '.') > 0 THEN CAST(substr({_FRACTION}, 7, 6) AS INTEGER) ELSE 0 END)"
)


def _to_row(record: TraceRecord) -> tuple[Any, ...]:
    r = record
    # Most traces have no tags and no notes: "[]" as orjson writes it, without the ~0.4 us call.
    tags, notes = r.agent_tags, r.notes
    return (
        r.id, to_micros(r.created_at), r.organization_id, r.user_id, r.step_id, r.agent_id,
        orjson.dumps(tags).decode() if tags else "[]", r.run_id, r.call_type, r.provider, r.model,
        r.model_endpoint_type, int(r.is_byok), r.request_json, r.response_json, r.error_type,
        r.error_message, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.cached_tokens,
        r.reasoning_tokens, r.latency_ms, r.time_to_first_token_ms, r.llm_config_json, r.owner,
        r.cache_write_tokens, orjson.dumps(notes).decode() if notes else "[]", r.route, r.deployment,
        r.attempts_json, r.cost_usd, r.key_id,
    )  # fmt: skip


def _from_row(row: Sequence[Any]) -> TraceRecord:
    values = list(row)
    values[_CREATED] = from_micros(values[_CREATED])
    values[_TAGS] = orjson.loads(values[_TAGS])
    values[_NOTES] = orjson.loads(values[_NOTES])
    values[_BYOK] = bool(values[_BYOK])
    return TraceRecord(*values)


class SQLiteTraceBackend(TraceBackend):
    """Traces in a local SQLite file (the default backend)."""

    name = "sqlite"
    readable = True
    threaded = True  # the writer calls write_batch_sync from its own thread
    # Every transaction rewrites the index pages it touches into the WAL: fewer, larger
    # transactions write far less (about 28,000 traces/s at 500 a batch, 40,000 at 2,000).
    batch_size = 2000

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Serializes the writing connection: the writer's thread, and write_batch callers.
        self._write_lock = threading.Lock()
        self._unchecked = 0  # traces written since the checkpointer was last woken
        self._unchecked_commits = 0  # batches written since then
        self._unchecked_text = 0  # characters of request and answer text written since then
        self._checkpoint_wake = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._stopping = False

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

    def _open_writer(self) -> sqlite3.Connection:
        # check_same_thread=False: opened here, used from the writer's thread, under _write_lock.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            for pragma in PRAGMAS:
                conn.execute(pragma)
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkpoint_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        frame_bytes = 16384 + 24  # a WAL frame: a page and its header (the page size is read below)
        try:
            while True:
                self._checkpoint_wake.wait()
                self._checkpoint_wake.clear()
                if self._stopping:
                    return
                try:
                    if conn is None:
                        fresh = sqlite3.connect(self.path, isolation_level=None)
                        try:
                            fresh.execute(f"PRAGMA busy_timeout={_TRUNCATE_WAIT_MS}")
                            frame_bytes = fresh.execute("PRAGMA page_size").fetchone()[0] + 24
                        except BaseException:  # opened again (and the page size read) next time
                            fresh.close()
                            raise
                        conn = fresh
                    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames * frame_bytes > _WAL_RESET_BYTES:  # never rewound: see the module's doc
                        # Under the write lock: SQLite's busy handler alone lets a writer that
                        # commits back to back (a saturated gateway) take the WAL first every time.
                        with self._write_lock:
                            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("sqlite trace store: checkpoint failed: %s", exc)
        finally:
            if conn is not None:
                conn.close()

    async def start(self) -> None:
        if self._writer is not None:
            return
        writer = await asyncio.to_thread(self._open_writer)
        try:
            self._reader = await self._connect()
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._stopping = False
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-trace-checkpoint", daemon=True
        )
        self._checkpointer.start()
        log.info("sqlite trace store ready at %s", self.path)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        if self._writer is not None:
            await asyncio.to_thread(self._close_writer)

    def _close_writer(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            self._stopping = True
            self._checkpoint_wake.set()
            checkpointer.join(timeout=30)
        with self._write_lock:  # after a batch in flight; closing checkpoints what is left
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.close()

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        await asyncio.to_thread(self.write_batch_sync, records)

    def write_batch_sync(self, records: Sequence[TraceRecord]) -> None:
        if not records:
            if self._writer is None:
                raise RuntimeError("sqlite trace store is not started")
            return
        params: list[Any] = []
        extend = params.extend
        text = 0
        for record in records:
            extend(_to_row(record))
            text += len(record.request_json) + len(record.response_json)
        width = len(TRACE_COLUMNS)
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("sqlite trace store is not started")
            conn.execute("BEGIN IMMEDIATE")
            try:
                done, total = 0, len(records)
                while done < total:
                    count = min(_CHUNK, 1 << ((total - done).bit_length() - 1))
                    conn.execute(_INSERTS[count], params[done * width : (done + count) * width])
                    done += count
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._committed(len(records), text)

    def _committed(self, rows: int, text: int = 0) -> None:
        """A transaction of `rows` rows (`text` characters of request and answer) written or
        deleted: wake the checkpointer when it is due."""
        self._unchecked += rows
        self._unchecked_commits += 1
        self._unchecked_text += text
        if (
            self._unchecked >= _CHECKPOINT_ROWS
            or self._unchecked_commits >= _CHECKPOINT_COMMITS
            or self._unchecked_text >= _CHECKPOINT_BYTES
        ):
            self._unchecked = self._unchecked_commits = self._unchecked_text = 0
            self._checkpoint_wake.set()

    async def prune(self, *, before: datetime, limit: int) -> int:
        return await asyncio.to_thread(self._prune_sync, to_micros(before), limit)

    def _prune_sync(self, before_us: int, limit: int) -> int:
        # On the writing connection, under its lock: one short transaction per small batch, so
        # the trace writer waits at most one batch's delete (ix_provider_traces_created finds them).
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("sqlite trace store is not started")
            cursor = conn.execute(
                "DELETE FROM provider_traces WHERE rowid IN"
                " (SELECT rowid FROM provider_traces WHERE created_at < ? LIMIT ?)",
                (before_us, limit),
            )
            deleted = int(cursor.rowcount)
            if deleted:  # a retention sweep of a backlog rewrites pages as inserts do
                self._committed(deleted)
            return deleted

    def rejects(self, exc: BaseException) -> bool:
        # DataError: a value SQLite refuses (SQLITE_TOOBIG); a full disk is not one (it may clear).
        return isinstance(exc, sqlite3.DataError) or super().rejects(exc)

    async def get_latest(
        self, *, organization_id: str, step_id: str, owner: str | None = None
    ) -> TraceRecord | None:
        where, params = "organization_id = ? AND step_id = ?", [organization_id, step_id]
        if owner is not None:
            where += " AND owner = ?"
            params.append(owner)
        rows = await self._fetch(f"{_SELECT} WHERE {where} ORDER BY created_at DESC, id DESC LIMIT 1", params)
        return _from_row(rows[0]) if rows else None

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        where, params = _where(query)
        params.append(clamp_limit(query.limit))
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?"
        if query.max_bytes is None:
            return [_from_row(row) for row in await self._fetch(sql, params)]
        if self._reader is None:
            raise RuntimeError("sqlite trace store is not started")
        # Row by row: SQLite steps lazily, so the rows after the byte bound are never read.
        out: builtins.list[TraceRecord] = []
        total = 0
        async with self._reader.execute(sql, params) as cursor:
            while total < query.max_bytes:
                row = await cursor.fetchone()
                if row is None:
                    break
                out.append(_from_row(row))
                total += record_bytes(out[-1])
        return out

    async def points(self, *, query: TraceQuery) -> builtins.list[TracePoint]:
        where, params = _where(query, cursor=False)
        params.append(min(clamp_limit(query.limit) if query.limit <= 0 else query.limit, MAX_POINTS))
        sql = (
            f"SELECT created_at, {', '.join(POINT_COLUMNS)} FROM provider_traces"
            f" WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        rows = await self._fetch(sql, params)
        # Up to MAX_POINTS objects: built off the loop (100,000 take a few hundred ms).
        return await asyncio.to_thread(lambda: [TracePoint(*row) for row in rows])

    async def usage(self, *, query: UsageQuery) -> builtins.list[UsageTotals]:
        where = ["organization_id = ?", "created_at >= ?", "created_at < ?"]
        params: list[Any] = [query.organization_id, to_micros(query.start_time), to_micros(query.end_time)]
        for column, value in query.filters():
            where.append(f"{column} = ?")
            params.append(value)
        groups = [_USAGE_GROUPS[g] for g in query.group_by]
        keys = ", ".join(groups)
        sql = (
            f"SELECT {keys + ', ' if keys else ''}COUNT(*), SUM(error_type != ''),"
            f" {', '.join(f'SUM({c})' for c in SUMMED)}, SUM(cost_usd IS NULL AND error_type = ''),"
            f" {_COST_PARTS} FROM provider_traces WHERE {' AND '.join(where)}"
            + (f" GROUP BY {keys} ORDER BY {keys}" if keys else "")
        )
        out = []
        for row in await self._fetch(sql, params):
            n = len(groups)
            whole, high, low = (int(v or 0) for v in row[-3:])
            if row[n] == 0:
                continue  # no trace in the range: no row
            values = dict(zip(query.group_by, (str(v) for v in row[:n]), strict=True))
            out.append(totals_from(values, list(row[n:-3]), whole * 10**12 + high * 10**6 + low))
        return out

    async def _fetch(self, sql: str, params: Sequence[Any]) -> builtins.list[Any]:
        if self._reader is None:
            raise RuntimeError("sqlite trace store is not started")
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())


def _where(query: TraceQuery, *, cursor: bool = True) -> tuple[list[str], list[Any]]:
    """The WHERE conditions (ANDed) and parameters of `query`."""
    where = ["organization_id = ?"]
    params: list[Any] = [query.organization_id]
    if query.owner is not None:
        where.append("owner = ?")
        params.append(query.owner)
    for column in ("step_id", "run_id", "agent_id", "model", "provider", "error_type"):
        value = getattr(query, column)
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if query.trace_id:
        where.append("id = ?")
        params.append(query.trace_id)
    if query.status == "ok":
        where.append("error_type = ''")
    elif query.status == "error":
        where.append("error_type != ''")
    if query.tag:
        where.append("EXISTS (SELECT 1 FROM json_each(agent_tags) WHERE value = ?)")
        params.append(query.tag)
    if query.start_time is not None:
        where.append("created_at >= ?")
        params.append(to_micros(query.start_time))
    if query.end_time is not None:
        where.append("created_at < ?")
        params.append(to_micros(query.end_time))
    if cursor and query.before is not None:
        where.append("(created_at, id) < (?, ?)")
        params.extend((to_micros(query.before[0]), query.before[1]))
    return where, params


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:  # no transaction left to roll back
        pass


def schema_version(conn: sqlite3.Connection) -> int:
    """The applied version of the trace schema (0 before any migration)."""
    row = conn.execute(READ_SCHEMA_VERSION, (COMPONENT,)).fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the pending migrations, each in its own transaction; returns the new version.

    `schema_version` has one row per component so other stores may share the file.
    BEGIN IMMEDIATE serializes concurrent starters (several worker processes).
    `conn` is in autocommit mode (isolation_level=None): we issue BEGIN/COMMIT ourselves.
    """
    conn.execute(SCHEMA_VERSION_TABLE)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version >= len(MIGRATIONS):
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(WRITE_SCHEMA_VERSION, (COMPONENT, version + 1))
            conn.execute("COMMIT")
            log.info("sqlite trace schema migrated to version %d", version + 1)
        except BaseException:
            _rollback(conn)
            raise
