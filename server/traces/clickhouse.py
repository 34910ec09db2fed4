"""Traces in ClickHouse, over its HTTP interface (aiohttp), for servers as old as 18.16.

Old servers have no DateTime64 and no query parameters, so:
- `created_at` is a `DateTime('UTC')` (seconds, for partitions and humans) and `created_at_us`
  a `UInt64` of microseconds since the epoch, which orders traces at sub-second resolution;
- every literal in a query is escaped here (`quote`), never interpolated raw.

Writes are batched `INSERT ... FORMAT JSONEachRow`. The table is a `ReplacingMergeTree` keyed
for reads (organization, step, time, id): a batch retried after an ambiguous failure leaves
duplicates that merges remove, and reads collapse them with `LIMIT 1 BY id` until then.

Error bodies of failed inserts may quote the rows; `ClickHouseError` keeps only the code and
the first words of the message, so no trace content reaches a log line.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson

from server.auth.redact import redact_url
from server.billing.cost import dollars, parse_dollars
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
    record_size_sql,
    to_micros,
)
from server.traces.usage import SUMMED, UsageQuery, UsageTotals, totals_from

log = logging.getLogger(__name__)

COMPONENT = "provider_traces"
TABLE = "provider_traces"

_SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS {database}.schema_version"
    " (component String, version UInt32, applied_at DateTime('UTC'))"
    " ENGINE = ReplacingMergeTree(version) ORDER BY component"
)

# Ordered; each entry brings the schema from version i to i + 1. Never edit a shipped entry.
# Old servers lack `ADD COLUMN IF NOT EXISTS`: the recorded version is what keeps this idempotent.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE IF NOT EXISTS {{database}}.{TABLE} (
            id String,
            created_at DateTime('UTC'),
            created_at_us UInt64,
            organization_id String,
            user_id String,
            step_id String,
            agent_id String,
            agent_tags Array(String),
            run_id String,
            call_type String,
            provider String,
            model String,
            model_endpoint_type String,
            is_byok UInt8,
            request_json String,
            response_json String,
            error_type String,
            error_message String,
            prompt_tokens Int64,
            completion_tokens Int64,
            total_tokens Int64,
            cached_tokens Int64,
            reasoning_tokens Int64,
            latency_ms Float64,
            time_to_first_token_ms Float64,
            llm_config_json String
        ) ENGINE = ReplacingMergeTree()
        PARTITION BY toYYYYMM(created_at)
        ORDER BY (organization_id, step_id, created_at_us, id)""",
    ),
    (
        # Who may read a trace besides admins (issue 12): rows written before stay admin-only
        # (the column's default is '').
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN owner String",
    ),
    # Usage.cache_write_tokens (issue 13): rows written before read 0.
    (f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN cache_write_tokens Int64",),
    # ProviderTrace.notes (issue 13): rows written before read an empty list.
    (f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN notes Array(String)",),
    # Routes (issue 16): rows written before were direct calls (the columns' default is '').
    (
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN route String",
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN deployment String",
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN attempts_json String",
    ),
    # Cost and key of each call (issue 17): Decimal is exact (12 fractional digits: pico-dollars);
    # NULL is unpriced.
    (
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN cost_usd Nullable(Decimal(38, 12))",
        f"ALTER TABLE {{database}}.{TABLE} ADD COLUMN key_id String",
    ),
)

# Columns as selected: created_at comes back as created_at_us for full resolution.
# cost_usd as text: JSON output would print the Decimal as a number, read back as a float.
_SELECT_COLUMNS = ", ".join(
    {"created_at": "created_at_us", "cost_usd": "toString(cost_usd) AS cost_usd"}.get(c, c)
    for c in TRACE_COLUMNS
)
_INT_COLUMNS = frozenset(
    (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cache_write_tokens",
    )
)
_SYNTAX_ERROR = 62  # ClickHouse's code for a statement it does not know (MODIFY TTL before 19.6)

_USAGE_GROUPS = {
    "day": "toString(toDate(created_at, 'UTC'))",  # created_at is DateTime('UTC'), whole seconds
    "model": "model",
    "key_id": "key_id",
    "user_id": "user_id",
}
_CONTROL_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
_CONTROL_RE = re.compile(r"[\\'\n\r\t\0]")
_ERROR_RE = re.compile(r"Code: (\d+)[.,]\s*(?:e\.displayText\(\) = )?(?:DB::Exception: )?([^:(\n]*)")


def quote(value: str) -> str:
    """A ClickHouse string literal for `value` (backslash escapes, as every version parses them)."""
    return "'" + _CONTROL_RE.sub(lambda m: _CONTROL_ESCAPES[m.group()], value) + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ClickHouseError(Exception):
    """A ClickHouse request failed; the message never quotes the data sent."""

    def __init__(self, status: int, code: int | None, summary: str) -> None:
        self.status = status
        self.code = code
        super().__init__(f"HTTP {status}, ClickHouse code {code}: {summary}" if code else f"HTTP {status}")


def _error_from_body(status: int, body: bytes) -> ClickHouseError:
    match = _ERROR_RE.search(body[:2000].decode(errors="replace"))
    if match is None:
        return ClickHouseError(status, None, "")
    return ClickHouseError(status, int(match.group(1)), match.group(2).strip()[:120])


def _to_row(r: TraceRecord) -> dict[str, Any]:
    micros = to_micros(r.created_at)
    return {
        "id": r.id, "created_at": micros // 1_000_000, "created_at_us": micros,
        "organization_id": r.organization_id, "user_id": r.user_id, "step_id": r.step_id,
        "agent_id": r.agent_id, "agent_tags": r.agent_tags, "run_id": r.run_id,
        "call_type": r.call_type, "provider": r.provider, "model": r.model,
        "model_endpoint_type": r.model_endpoint_type, "is_byok": int(r.is_byok),
        "request_json": r.request_json, "response_json": r.response_json,
        "error_type": r.error_type, "error_message": r.error_message,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens, "cached_tokens": r.cached_tokens,
        "reasoning_tokens": r.reasoning_tokens, "latency_ms": r.latency_ms,
        "time_to_first_token_ms": r.time_to_first_token_ms, "llm_config_json": r.llm_config_json,
        "owner": r.owner, "cache_write_tokens": r.cache_write_tokens, "notes": r.notes,
        "route": r.route, "deployment": r.deployment, "attempts_json": r.attempts_json,
        # Raw JSON number text: exact into the Decimal column (a JSON string is refused, a float
        # would round).
        "cost_usd": None if r.cost_usd is None else orjson.Fragment(r.cost_usd), "key_id": r.key_id,
    }  # fmt: skip


def _from_row(row: Mapping[str, Any]) -> TraceRecord:
    values: dict[str, Any] = {c: row[c] for c in TRACE_COLUMNS if c != "created_at"}
    values["created_at"] = from_micros(int(row["created_at_us"]))
    values["is_byok"] = bool(int(row["is_byok"]))
    # NaN and infinities come back as JSON null: read as 0 rather than fail every read of the row.
    values["latency_ms"] = float(row["latency_ms"] or 0.0)
    values["time_to_first_token_ms"] = float(row["time_to_first_token_ms"] or 0.0)
    for column in _INT_COLUMNS:
        values[column] = int(row[column])  # 64-bit integers come back as JSON strings
    values["agent_tags"] = list(row["agent_tags"])
    values["notes"] = list(row["notes"])
    cost = row["cost_usd"]
    values["cost_usd"] = None if cost is None else dollars(parse_dollars(cost))
    return TraceRecord(**values)


class ClickHouseTraceBackend(TraceBackend):
    """Traces in a ClickHouse table, read by organization and step, newest first.

    `url` is `http[s]://[user[:password]@]host[:port][/database]`; `?database=`, `?user=` and
    `?password=` are accepted too. Pass `session` to share an aiohttp session (not closed here).
    """

    name = "clickhouse"
    readable = True

    def __init__(
        self, url: str, *, session: aiohttp.ClientSession | None = None, timeout: float = 30.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"clickhouse url must be http(s)://host[:port]: {redact_url(url)}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._url = redact_url(url)
        port = parts.port or (8443 if parts.scheme == "https" else 8123)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self._endpoint = f"{parts.scheme}://{host}:{port}/"
        self.database = query.get("database") or parts.path.strip("/") or "default"
        user = parts.username or query.get("user") or "default"
        self._password = parts.password or query.get("password") or ""
        self._headers = {"X-ClickHouse-User": user}
        if self._password:
            self._headers["X-ClickHouse-Key"] = self._password
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._database_sql = quote_identifier(self.database)
        self._table = f"{self._database_sql}.{quote_identifier(TABLE)}"
        self._ttl = False  # LLMGW_TRACE_RETENTION applied as a table TTL

    def __repr__(self) -> str:
        return f"ClickHouseTraceBackend({self._url!r})"

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await self._request(f"CREATE DATABASE IF NOT EXISTS {self._database_sql}")
        await self.migrate()
        log.info("clickhouse trace store ready at %s", self._url)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def schema_version(self) -> int:
        """The applied version of the trace schema (0 before any migration)."""
        await self._request(_SCHEMA_VERSION_TABLE.format(database=self._database_sql))
        body = await self._request(
            f"SELECT max(version) AS version FROM {self._database_sql}.schema_version"
            f" WHERE component = {quote(COMPONENT)}"
            " FORMAT JSONEachRow"
        )
        lines = body.splitlines()
        return int(orjson.loads(lines[0])["version"]) if lines else 0

    async def migrate(self) -> int:
        """Apply the pending migrations in order, recording each; returns the new version."""
        version = await self.schema_version()
        for index in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[index]:
                await self._request(statement.format(database=self._database_sql))
            await self._request(
                f"INSERT INTO {self._database_sql}.schema_version (component, version, applied_at)"
                f" VALUES ({quote(COMPONENT)}, {index + 1}, now())"
            )
            log.info("clickhouse trace schema migrated to version %d", index + 1)
        return max(version, len(MIGRATIONS))

    async def apply_retention(self, seconds: float) -> None:
        # ClickHouse expires rows itself, as parts merge: a table TTL instead of deletes.
        ttl = f"toIntervalSecond({int(seconds)})"
        created = await self._request(
            f"SELECT create_table_query FROM system.tables WHERE database = {quote(self.database)}"
            f" AND name = {quote(TABLE)}"
        )
        if ttl.encode() in created:  # already so: MODIFY TTL rewrites every part, skip it
            self._ttl = True
            return
        try:
            await self._request(
                f"ALTER TABLE {self._table} MODIFY TTL created_at + INTERVAL {int(seconds)} SECOND"
            )
            self._ttl = True
        except ClickHouseError as exc:
            if exc.code != _SYNTAX_ERROR:
                raise
            # Servers before 19.6 have no TTL: `prune` then asks for a DELETE mutation instead.
            log.info(
                "clickhouse trace store: no table TTL on this server; old traces are deleted by mutations"
            )

    async def prune(self, *, before: datetime, limit: int) -> int:
        """Without a TTL: one background DELETE mutation for everything older (ClickHouse runs it
        in its own time, part by part); none while an earlier one is still running. Returns 0:
        the rows go later, asynchronously, so `limit` does not apply."""
        if self._ttl:
            return 0
        cutoff = int(before.timestamp())
        pending = await self._request(
            "SELECT count() FROM system.mutations WHERE is_done = 0"
            f" AND database = {quote(self.database)} AND table = {quote(TABLE)}"
        )
        if int(pending.strip() or 0):
            return 0
        old = await self._request(
            f"SELECT count() FROM {self._table} WHERE created_at < toDateTime({cutoff})"
        )
        if int(old.strip() or 0):
            await self._request(f"ALTER TABLE {self._table} DELETE WHERE created_at < toDateTime({cutoff})")
            log.info("clickhouse trace store: deleting %s traces older than %s", old.strip().decode(), before)
        return 0

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        if not records:
            return
        body = b"\n".join(orjson.dumps(_to_row(r)) for r in records)
        await self._request(f"INSERT INTO {self._table} FORMAT JSONEachRow", body=body)

    async def get_latest(
        self, *, organization_id: str, step_id: str, owner: str | None = None
    ) -> TraceRecord | None:
        where = f"organization_id = {quote(organization_id)} AND step_id = {quote(step_id)}"
        if owner is not None:
            where += f" AND owner = {quote(owner)}"
        rows = await self._select(where, 1)
        return rows[0] if rows else None

    def _where(self, query: TraceQuery) -> builtins.list[str]:
        where = [f"organization_id = {quote(query.organization_id)}"]
        if query.owner is not None:
            where.append(f"owner = {quote(query.owner)}")
        for column in ("step_id", "run_id", "agent_id", "model", "provider", "error_type"):
            value = getattr(query, column)
            if value:
                where.append(f"{column} = {quote(value)}")
        if query.trace_id:
            where.append(f"id = {quote(query.trace_id)}")
        if query.status == "ok":
            where.append("error_type = ''")
        elif query.status == "error":
            where.append("error_type != ''")
        if query.tag:
            where.append(f"has(agent_tags, {quote(query.tag)})")
        if query.start_time is not None:
            where.append(f"created_at_us >= {to_micros(query.start_time)}")
        if query.end_time is not None:
            where.append(f"created_at_us < {to_micros(query.end_time)}")
        return where

    async def points(self, *, query: TraceQuery) -> builtins.list[TracePoint]:
        where = self._where(query)
        limit = min(clamp_limit(query.limit) if query.limit <= 0 else query.limit, MAX_POINTS)
        body = await self._request(
            f"SELECT created_at_us, {', '.join(POINT_COLUMNS)} FROM {self._table}"
            f" WHERE {' AND '.join(where)}"
            f" ORDER BY created_at_us DESC, id DESC LIMIT 1 BY id LIMIT {int(limit)}"
            " FORMAT JSONEachRow",  # not JSONCompactEachRow: older servers (18.16) lack it
            settings={"wait_end_of_query": "1"},
        )
        # Up to MAX_POINTS rows to parse: off the loop (100,000 take a few hundred ms).
        return await asyncio.to_thread(_points_of, body)

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        where = self._where(query)
        if query.before is not None:
            micros, trace_id = to_micros(query.before[0]), quote(query.before[1])
            where.append(f"(created_at_us < {micros} OR (created_at_us = {micros} AND id < {trace_id}))")
        limit = clamp_limit(query.limit)
        if query.max_bytes is not None:
            # Old servers have no window functions: read the sizes first, then only the rows
            # that fit (and the one that crosses the bound).
            body = await self._request(
                f"SELECT id, {record_size_sql('length')} AS size FROM {self._table}"
                f" WHERE {' AND '.join(where)}"
                f" ORDER BY created_at_us DESC, id DESC LIMIT 1 BY id LIMIT {int(limit)}"
                " FORMAT JSONEachRow",
                settings={"wait_end_of_query": "1"},
            )
            ids: builtins.list[str] = []
            total = 0
            for line in body.splitlines():
                if total >= query.max_bytes:
                    break
                if line.strip():
                    row = orjson.loads(line)
                    ids.append(row["id"])
                    total += int(row["size"])
            if not ids:
                return []
            where.append(f"id IN ({', '.join(quote(i) for i in ids)})")
            limit = len(ids)
        return await self._select(" AND ".join(where), limit)

    async def usage(self, *, query: UsageQuery) -> builtins.list[UsageTotals]:
        where = [
            f"organization_id = {quote(query.organization_id)}",
            f"created_at_us >= {to_micros(query.start_time)}",
            f"created_at_us < {to_micros(query.end_time)}",
        ]
        for column, value in query.filters():
            where.append(f"{column} = {quote(value)}")
        groups = [_USAGE_GROUPS[g] for g in query.group_by]
        keys = ", ".join(f"{expr} AS g{i}" for i, expr in enumerate(groups))
        names = ", ".join(f"g{i}" for i in range(len(groups)))
        sums = ", ".join(f"toString(sum({c})) AS {c}" for c in SUMMED)
        # Rows a retried batch wrote twice are merged away lazily: read each trace id once.
        body = await self._request(
            f"SELECT {keys + ', ' if keys else ''}toString(count()) AS requests,"
            f" toString(countIf(error_type != '')) AS errors, {sums},"
            " toString(countIf(isNull(cost_usd) AND error_type = '')) AS unpriced,"
            " toString(sum(ifNull(cost_usd, toDecimal128(0, 12)))) AS cost"
            f" FROM (SELECT * FROM {self._table} WHERE {' AND '.join(where)} LIMIT 1 BY id)"
            + (f" GROUP BY {names} ORDER BY {names}" if names else "")
            + " FORMAT JSONEachRow",
            settings={"wait_end_of_query": "1"},
        )
        out = []
        for line in body.splitlines():
            if not line.strip():
                continue
            row = orjson.loads(line)
            if int(row["requests"]) == 0:
                continue
            values = {name: str(row[f"g{i}"]) for i, name in enumerate(query.group_by)}
            counts = [
                int(row["requests"]),
                int(row["errors"]),
                *(int(row[c]) for c in SUMMED),
                int(row["unpriced"]),
            ]
            out.append(totals_from(values, counts, parse_dollars(row["cost"])))
        return out

    async def _select(self, where: str, limit: int) -> builtins.list[TraceRecord]:
        body = await self._request(
            f"SELECT {_SELECT_COLUMNS} FROM {self._table} WHERE {where}"
            f" ORDER BY created_at_us DESC, id DESC LIMIT 1 BY id LIMIT {int(limit)}"
            " FORMAT JSONEachRow",
            # Buffer the whole answer so a failure is an HTTP error, not a truncated 200.
            settings={"wait_end_of_query": "1"},
        )
        return [_from_row(orjson.loads(line)) for line in body.splitlines() if line.strip()]

    async def _request(
        self, sql: str, *, body: bytes | None = None, settings: Mapping[str, str] | None = None
    ) -> bytes:
        """POST one statement; with `body`, the statement goes in the URL and `body` is its data.

        Statements name their database, so none is selected (it may not exist yet).
        """
        if self._session is None:
            raise RuntimeError("clickhouse trace store is not started")
        params = dict(settings or {})
        if body is None:
            data = sql.encode()
        else:
            params["query"] = sql
            data = body
        try:
            async with self._session.post(
                self._endpoint, params=params, data=data, headers=self._headers, timeout=self._timeout
            ) as response:
                payload = await response.read()
                if response.status != 200:
                    raise _error_from_body(response.status, payload)
                return payload
        except aiohttp.ClientError as exc:
            # aiohttp messages name the host and port, never the credentials (sent as headers).
            raise ConnectionError(f"clickhouse at {self._url}: {type(exc).__name__}: {exc}") from exc


def _points_of(body: bytes) -> list[TracePoint]:
    """The `TracePoint`s of a JSONEachRow answer."""
    out: list[TracePoint] = []
    for line in body.splitlines():
        if line.strip():
            row = orjson.loads(line)
            out.append(
                TracePoint(
                    int(row["created_at_us"]),
                    row["provider"],
                    row["model"],
                    row["error_type"],
                    float(row["latency_ms"]),
                    float(row["time_to_first_token_ms"]),
                    int(row["prompt_tokens"]),
                    int(row["completion_tokens"]),
                )
            )
    return out
