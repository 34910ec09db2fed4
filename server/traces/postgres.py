"""Traces in PostgreSQL (table `provider_traces`, as in the seed), through an asyncpg pool.

Batches go in with COPY, the fastest path; if a retried batch meets a trace that an earlier,
ambiguous attempt already stored, the batch is written again with `ON CONFLICT DO NOTHING`.
JSON columns are `text`: they hold what was sent and received byte for byte, and an empty
response (a failed call) is not valid JSON.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from server.auth.redact import describe_error, redact_url
from server.billing.cost import dollars_of_decimal
from server.traces.base import (
    MAX_POINTS,
    POINT_COLUMNS,
    TRACE_COLUMNS,
    TraceBackend,
    TracePoint,
    TraceQuery,
    TraceRecord,
    clamp_limit,
    record_size_sql,
)
from server.traces.usage import SUMMED, UsageQuery, UsageTotals, totals_from

log = logging.getLogger(__name__)

COMPONENT = "provider_traces"
# pg_advisory_xact_lock key serializing migrations across gateway processes ("trac").
_MIGRATION_LOCK = 0x74726163

# Ordered; each entry brings the schema from version i to i + 1. Never edit a shipped entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS provider_traces (
            id text PRIMARY KEY,
            created_at timestamptz NOT NULL,
            organization_id text NOT NULL DEFAULT '',
            user_id text NOT NULL DEFAULT '',
            step_id text NOT NULL DEFAULT '',
            agent_id text NOT NULL DEFAULT '',
            agent_tags text[] NOT NULL DEFAULT '{}',
            run_id text NOT NULL DEFAULT '',
            call_type text NOT NULL DEFAULT 'agent_step',
            provider text NOT NULL DEFAULT '',
            model text NOT NULL DEFAULT '',
            model_endpoint_type text NOT NULL DEFAULT '',
            is_byok boolean NOT NULL DEFAULT false,
            request_json text NOT NULL DEFAULT '',
            response_json text NOT NULL DEFAULT '',
            error_type text NOT NULL DEFAULT '',
            error_message text NOT NULL DEFAULT '',
            prompt_tokens bigint NOT NULL DEFAULT 0,
            completion_tokens bigint NOT NULL DEFAULT 0,
            total_tokens bigint NOT NULL DEFAULT 0,
            cached_tokens bigint NOT NULL DEFAULT 0,
            reasoning_tokens bigint NOT NULL DEFAULT 0,
            latency_ms double precision NOT NULL DEFAULT 0,
            time_to_first_token_ms double precision NOT NULL DEFAULT 0,
            llm_config_json text NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_step_id ON provider_traces (step_id)",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_org_step ON provider_traces"
        " (organization_id, step_id, created_at DESC, id DESC)",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_run ON provider_traces (run_id, created_at DESC)",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_org_created ON provider_traces"
        " (organization_id, created_at DESC, id DESC)",
    ),
    (
        # Who may read a trace besides admins (issue 12): rows written before stay admin-only.
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT ''",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_org_owner_created ON provider_traces"
        " (organization_id, owner, created_at DESC, id DESC)",
    ),
    # Usage.cache_write_tokens (issue 13): rows written before report 0.
    ("ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS cache_write_tokens bigint NOT NULL DEFAULT 0",),
    # ProviderTrace.notes (issue 13): rows written before have none.
    ("ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS notes text[] NOT NULL DEFAULT '{}'",),
    # The console's trace list filtered by model or by error reason, newest first (issue 18).
    (
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_org_model_created ON provider_traces"
        " (organization_id, model, created_at DESC, id DESC)",
        "CREATE INDEX IF NOT EXISTS ix_provider_traces_org_error_created ON provider_traces"
        " (organization_id, error_type, created_at DESC, id DESC)",
    ),
    # Routes (issue 16): rows written before were direct calls.
    (
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS route text NOT NULL DEFAULT ''",
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS deployment text NOT NULL DEFAULT ''",
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS attempts_json text NOT NULL DEFAULT ''",
    ),
    # Cost and key of each call (issue 17): numeric is exact (12 fractional digits: pico-dollars);
    # NULL is unpriced.
    (
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS cost_usd numeric(38, 12)",
        "ALTER TABLE provider_traces ADD COLUMN IF NOT EXISTS key_id text NOT NULL DEFAULT ''",
    ),
)

_COLUMN_LIST = ", ".join(TRACE_COLUMNS)
_COST = TRACE_COLUMNS.index("cost_usd")
_SELECT = f"SELECT {_COLUMN_LIST} FROM provider_traces"
# octet_length of a TOASTed text reads its header only: the sizes cost no detoasting.
_SIZE = record_size_sql("octet_length")
_INSERT_IGNORE = (
    f"INSERT INTO provider_traces ({_COLUMN_LIST})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(TRACE_COLUMNS) + 1))})"
    " ON CONFLICT (id) DO NOTHING"
)


def _to_row(r: TraceRecord) -> tuple[Any, ...]:
    row = (
        r.id, r.created_at, r.organization_id, r.user_id, r.step_id, r.agent_id, list(r.agent_tags),
        r.run_id, r.call_type, r.provider, r.model, r.model_endpoint_type, r.is_byok, r.request_json,
        r.response_json, r.error_type, r.error_message, r.prompt_tokens, r.completion_tokens,
        r.total_tokens, r.cached_tokens, r.reasoning_tokens, r.latency_ms, r.time_to_first_token_ms,
        r.llm_config_json, r.owner, r.cache_write_tokens, list(r.notes), r.route, r.deployment,
        r.attempts_json, None if r.cost_usd is None else Decimal(r.cost_usd), r.key_id,
    )  # fmt: skip
    # PostgreSQL text cannot hold NUL; one such character would fail the whole batch forever.
    if (
        any(isinstance(v, str) and "\x00" in v for v in row)
        or any("\x00" in t for t in r.agent_tags)
        or any("\x00" in n for n in r.notes)
    ):
        row = tuple(_without_nul(v) for v in row)
    return row


_USAGE_GROUPS = {
    "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "model",
    "key_id": "key_id",
    "user_id": "user_id",
}


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _from_row(row: Any) -> TraceRecord:
    values = list(row)
    values[TRACE_COLUMNS.index("agent_tags")] = list(values[TRACE_COLUMNS.index("agent_tags")])
    values[TRACE_COLUMNS.index("notes")] = list(values[TRACE_COLUMNS.index("notes")])
    cost = values[_COST]
    values[_COST] = None if cost is None else dollars_of_decimal(cost)
    return TraceRecord(*values)


def _password_of(dsn: str) -> str:
    try:
        return urlsplit(dsn).password or ""
    except ValueError:
        return ""


class PostgresTraceBackend(TraceBackend):
    """Traces in a PostgreSQL database."""

    name = "postgres"
    readable = True

    def __init__(self, dsn: str, *, min_pool_size: int = 1, max_pool_size: int = 4) -> None:
        self._dsn = dsn
        self._min_pool_size = min_pool_size
        self._max_pool_size = max_pool_size
        self._password = _password_of(dsn)
        self._pool: Any = None  # asyncpg.Pool

    def __repr__(self) -> str:
        return f"PostgresTraceBackend({redact_url(self._dsn)!r})"

    async def start(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=self._min_pool_size, max_size=self._max_pool_size
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Say which server failed, never with its password.
            raise ConnectionError(
                f"cannot connect to postgres at {redact_url(self._dsn)}: "
                f"{describe_error(exc, self._password)}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        log.info("postgres trace store ready at %s", redact_url(self._dsn))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def apply_retention(self, seconds: float) -> None:
        # Not a migration: only a server that prunes needs it. CONCURRENTLY does not block the
        # trace writes while it builds on a big table; a second worker's attempt just fails.
        try:
            await self._require_pool().execute(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_provider_traces_created"
                " ON provider_traces (created_at)"
            )
        except asyncpg.PostgresError as exc:
            log.warning("postgres trace store: index for retention not created: %s", describe_error(exc))

    async def prune(self, *, before: datetime, limit: int) -> int:
        status = await self._require_pool().execute(
            "DELETE FROM provider_traces WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM provider_traces WHERE created_at < $1 LIMIT $2))",
            before,
            limit,
        )
        return int(str(status).rsplit(" ", 1)[-1])

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("postgres trace store is not started")
        return self._pool

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        if not records:
            return
        rows = [_to_row(r) for r in records]
        async with self._require_pool().acquire() as conn:
            try:
                await conn.copy_records_to_table("provider_traces", records=rows, columns=TRACE_COLUMNS)
            except asyncpg.UniqueViolationError:
                async with conn.transaction():
                    await conn.executemany(_INSERT_IGNORE, rows)

    def rejects(self, exc: BaseException) -> bool:
        # Data exceptions (class 22: a value out of range, invalid text) and program limits
        # (class 54: an index entry over btree's 2704 bytes, e.g. a caller's huge step_id) fail
        # the same row every time.
        return isinstance(exc, (asyncpg.DataError, asyncpg.ProgramLimitExceededError)) or super().rejects(exc)

    async def get_latest(
        self, *, organization_id: str, step_id: str, owner: str | None = None
    ) -> TraceRecord | None:
        # Filters go through _without_nul as the rows did (text cannot hold NUL: a NUL in a
        # filter would fail the query, INTERNAL; replaced, it finds the trace written with it).
        params: list[Any] = [organization_id, _without_nul(step_id)]
        where = "organization_id = $1 AND step_id = $2"
        if owner is not None:
            params.append(_without_nul(owner))
            where += " AND owner = $3"
        row = await self._require_pool().fetchrow(
            f"{_SELECT} WHERE {where} ORDER BY created_at DESC, id DESC LIMIT 1", *params
        )
        return _from_row(row) if row is not None else None

    async def usage(self, *, query: UsageQuery) -> list[UsageTotals]:
        params: list[Any] = [_without_nul(query.organization_id), query.start_time, query.end_time]
        where = ["organization_id = $1", "created_at >= $2", "created_at < $3"]
        for column, value in query.filters():
            params.append(_without_nul(value))
            where.append(f"{column} = ${len(params)}")
        groups = [_USAGE_GROUPS[g] for g in query.group_by]
        keys = ", ".join(groups)
        sql = (
            f"SELECT {keys + ', ' if keys else ''}COUNT(*), COUNT(*) FILTER (WHERE error_type <> ''),"
            f" {', '.join(f'SUM({c})' for c in SUMMED)},"
            " COUNT(*) FILTER (WHERE cost_usd IS NULL AND error_type = ''), SUM(cost_usd)"
            f" FROM provider_traces WHERE {' AND '.join(where)}"
            + (f" GROUP BY {keys} ORDER BY {keys}" if keys else "")
        )
        out = []
        for row in await self._require_pool().fetch(sql, *params):
            n = len(groups)
            if row[n] == 0:
                continue
            values = dict(zip(query.group_by, (str(row[i]) for i in range(n)), strict=True))
            cost = row[len(row) - 1]
            pico = int(cost.scaleb(12).to_integral_value()) if cost is not None else 0
            out.append(totals_from(values, [row[i] for i in range(n, len(row) - 1)], pico))
        return out

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        return await self._read(query, points=False)  # type: ignore[return-value]

    async def points(self, *, query: TraceQuery) -> builtins.list[TracePoint]:
        return await self._read(query, points=True)  # type: ignore[return-value]

    async def _read(
        self, query: TraceQuery, *, points: bool
    ) -> builtins.list[TraceRecord] | builtins.list[TracePoint]:
        params: list[Any] = [query.organization_id]
        where = ["organization_id = $1"]

        def add(condition: str, *values: Any) -> None:
            placeholders = []
            for value in values:
                params.append(_without_nul(value))  # as the rows were written
                placeholders.append(f"${len(params)}")
            where.append(condition.format(*placeholders))

        if query.owner is not None:
            add("owner = {}", query.owner)
        for column in ("step_id", "run_id", "agent_id", "model", "provider", "error_type"):
            value = getattr(query, column)
            if value:
                add(column + " = {}", value)
        if query.trace_id:
            add("id = {}", query.trace_id)
        if query.status == "ok":
            where.append("error_type = ''")
        elif query.status == "error":
            where.append("error_type <> ''")
        if query.tag:
            add("{} = ANY(agent_tags)", query.tag)
        if query.start_time is not None:
            add("created_at >= {}", query.start_time)
        if query.end_time is not None:
            add("created_at < {}", query.end_time)
        if query.before is not None and not points:
            add("(created_at, id) < ({}, {})", *query.before)
        if points:
            params.append(min(clamp_limit(query.limit) if query.limit <= 0 else query.limit, MAX_POINTS))
            rows = await self._require_pool().fetch(
                f"SELECT (extract(epoch FROM created_at) * 1000000)::bigint, {', '.join(POINT_COLUMNS)}"
                f" FROM provider_traces WHERE {' AND '.join(where)}"
                f" ORDER BY created_at DESC, id DESC LIMIT ${len(params)}",
                *params,
            )
            # Up to MAX_POINTS objects: built off the loop (100,000 take a few hundred ms).
            return await asyncio.to_thread(lambda: [TracePoint(*row) for row in rows])
        params.append(clamp_limit(query.limit))
        order = "ORDER BY created_at DESC, id DESC"
        sql = f"{_SELECT} WHERE {' AND '.join(where)} {order} LIMIT ${len(params)}"
        if query.max_bytes is not None:
            # Keep the rows whose predecessors hold less than max_bytes (a running sum), so the
            # server sends, and we load, at most one trace past the bound.
            params.append(query.max_bytes)
            sql = (
                f"SELECT {_COLUMN_LIST} FROM (SELECT {_COLUMN_LIST},"
                f" sum({_SIZE}) OVER ({order}) - ({_SIZE}) AS bytes_before"
                f" FROM provider_traces WHERE {' AND '.join(where)} {order} LIMIT ${len(params) - 1})"
                f" AS page WHERE bytes_before < ${len(params)} {order}"
            )
        rows = await self._require_pool().fetch(sql, *params)
        return [_from_row(row) for row in rows]


async def migrate(conn: Any) -> int:
    """Apply the pending migrations in one transaction under an advisory lock; returns the version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (component text PRIMARY KEY, version integer NOT NULL)"
        )
        version = await conn.fetchval("SELECT version FROM schema_version WHERE component = $1", COMPONENT)
        version = int(version or 0)
        for index in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[index]:
                await conn.execute(statement)
        if version < len(MIGRATIONS):
            await conn.execute(
                "INSERT INTO schema_version (component, version) VALUES ($1, $2)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                COMPONENT,
                len(MIGRATIONS),
            )
            log.info("postgres trace schema migrated from version %d to %d", version, len(MIGRATIONS))
        return len(MIGRATIONS) if version < len(MIGRATIONS) else version
