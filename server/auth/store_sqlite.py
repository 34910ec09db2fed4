"""The auth store in the embedded SQLite file (`LLMGW_SQLITE_PATH`), next to the trace tables.

Its tables (`gateway_keys`, `providers`, `gateway_limits`) are component `gateway_auth` of the
file's `schema_version` table (server/sqlite_file.py), next to the trace store's row, so the two
stores' migrations never collide. Files made before that kept the count in a table of its own,
`auth_schema_version`: its version moves to `schema_version` and the table is dropped, in the
same transaction as any pending migration (keys and providers untouched). Migrations run inside
`BEGIN IMMEDIATE`, so several workers starting at once migrate exactly once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from server.auth.store import (
    DEFAULT_CACHE_TTL,
    AuthStore,
    KeyRow,
    ProviderAlreadyExists,
    ProviderRecord,
    utcnow,
)
from server.sqlite_file import (
    NEW_FILE_PRAGMAS,
    READ_SCHEMA_VERSION,
    SCHEMA_VERSION_TABLE,
    WRITE_SCHEMA_VERSION,
)

COMPONENT = "gateway_auth"

# Each entry migrates from version i to i + 1. Append only; never edit a released entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE gateway_keys (
            key_id          TEXT PRIMARY KEY,
            key_hash        TEXT NOT NULL,
            organization_id TEXT NOT NULL,
            user_id         TEXT NOT NULL DEFAULT '',
            is_admin        INTEGER NOT NULL DEFAULT 0,
            created_at      TEXT NOT NULL,
            revoked_at      TEXT
        )
        """,
        "CREATE INDEX gateway_keys_organization ON gateway_keys (organization_id, created_at)",
        """
        CREATE TABLE providers (
            id                TEXT PRIMARY KEY,
            organization_id   TEXT NOT NULL,
            name              TEXT NOT NULL,
            endpoint_type     TEXT NOT NULL,
            base_url          TEXT NOT NULL,
            api_key_encrypted TEXT NOT NULL,
            api_key_last4     TEXT NOT NULL DEFAULT '',
            created_at        TEXT NOT NULL,
            UNIQUE (organization_id, name)
        )
        """,
    ),
    # Limits per key and organization (issue 17); spend in nano-dollars, NULL = no limit.
    (
        """
        CREATE TABLE gateway_limits (
            scope               TEXT NOT NULL,
            subject             TEXT NOT NULL,
            requests_per_minute INTEGER,
            tokens_per_minute   INTEGER,
            spend_per_day       INTEGER,
            spend_per_month     INTEGER,
            updated_at          TEXT NOT NULL,
            PRIMARY KEY (scope, subject)
        )
        """,
    ),
)

_KEY_COLUMNS = "key_id, key_hash, organization_id, user_id, is_admin, created_at, revoked_at"
_PROVIDER_COLUMNS = (
    "id, organization_id, name, endpoint_type, base_url, api_key_encrypted, api_key_last4, created_at"
)


_LIMIT_COLUMNS = "scope, subject, requests_per_minute, tokens_per_minute, spend_per_day, spend_per_month"


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _key_row(row: Any) -> KeyRow:
    created = _dt(row[5])
    assert created is not None
    return KeyRow(
        key_id=row[0],
        key_hash=row[1],
        organization_id=row[2],
        user_id=row[3],
        is_admin=bool(row[4]),
        created_at=created,
        revoked_at=_dt(row[6]),
    )


def _provider(row: Any) -> ProviderRecord:
    created = _dt(row[7])
    assert created is not None
    return ProviderRecord(
        id=row[0],
        organization_id=row[1],
        name=row[2],
        endpoint_type=row[3],
        base_url=row[4],
        api_key_encrypted=row[5],
        api_key_last4=row[6],
        created_at=created,
    )


class SqliteAuthStore(AuthStore):
    """Gateway keys and providers in a SQLite file (one connection; aiosqlite runs it in a thread)."""

    name = "sqlite"

    def __init__(self, *, path: str, cache_ttl: float = DEFAULT_CACHE_TTL) -> None:
        super().__init__(cache_ttl=cache_ttl)
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteAuthStore.start() was not called")
        return self._db

    async def start(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:" and not self.path.startswith("file:"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; the migration opens its own transaction explicitly.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            for pragma in NEW_FILE_PRAGMAS:  # page size before WAL (see server/sqlite_file.py)
                await db.execute(pragma)
            await self._migrate(db)
        except BaseException:
            await db.close()
            raise
        self._db = db

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(SCHEMA_VERSION_TABLE)
            current = await _legacy_version(db)
            if current is None:
                async with db.execute(READ_SCHEMA_VERSION, (COMPONENT,)) as cur:
                    row = await cur.fetchone()
                current = int(row[0]) if row else 0
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    await db.execute(statement)
            await db.execute(WRITE_SCHEMA_VERSION, (COMPONENT, max(current, len(MIGRATIONS))))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def _insert_key(self, *, row: KeyRow) -> None:
        await self.db.execute(
            f"INSERT INTO gateway_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.key_id,
                row.key_hash,
                row.organization_id,
                row.user_id,
                int(row.is_admin),
                _ts(row.created_at),
                _ts(row.revoked_at),
            ),
        )

    async def _fetch_key(self, *, key_id: str) -> KeyRow | None:
        async with self.db.execute(
            f"SELECT {_KEY_COLUMNS} FROM gateway_keys WHERE key_id = ?", (key_id,)
        ) as cur:
            row = await cur.fetchone()
        return _key_row(row) if row is not None else None

    async def _select_keys(self, *, organization_id: str | None) -> list[KeyRow]:
        sql = f"SELECT {_KEY_COLUMNS} FROM gateway_keys"
        params: tuple[str, ...] = ()
        if organization_id is not None:
            sql += " WHERE organization_id = ?"
            params = (organization_id,)
        async with self.db.execute(sql + " ORDER BY created_at, key_id", params) as cur:
            return [_key_row(row) for row in await cur.fetchall()]

    async def _mark_revoked(self, *, key_id: str, at: datetime) -> bool:
        async with self.db.execute(
            "UPDATE gateway_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (_ts(at), key_id),
        ) as cur:
            return bool(cur.rowcount)

    async def _count_active_keys(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM gateway_keys WHERE revoked_at IS NULL") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _upsert_limits(self, *, scope: str, subject: str, values: tuple[int | None, ...]) -> None:
        if all(v is None for v in values):
            await self.db.execute(
                "DELETE FROM gateway_limits WHERE scope = ? AND subject = ?", (scope, subject)
            )
            return
        await self.db.execute(
            f"INSERT INTO gateway_limits ({_LIMIT_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (scope, subject) DO UPDATE SET requests_per_minute = excluded.requests_per_minute,"
            " tokens_per_minute = excluded.tokens_per_minute, spend_per_day = excluded.spend_per_day,"
            " spend_per_month = excluded.spend_per_month, updated_at = excluded.updated_at",
            (scope, subject, *values, _ts(utcnow())),
        )

    async def _fetch_limits(self, *, scope: str, subject: str) -> tuple[int | None, ...] | None:
        async with self.db.execute(
            f"SELECT {_LIMIT_COLUMNS} FROM gateway_limits WHERE scope = ? AND subject = ?", (scope, subject)
        ) as cur:
            row = await cur.fetchone()
        return tuple(row[2:]) if row is not None else None

    async def _insert_provider(self, *, record: ProviderRecord) -> None:
        try:
            await self.db.execute(
                f"INSERT INTO providers ({_PROVIDER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.organization_id,
                    record.name,
                    record.endpoint_type,
                    record.base_url,
                    record.api_key_encrypted,
                    record.api_key_last4,
                    _ts(record.created_at),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise ProviderAlreadyExists(organization_id=record.organization_id, name=record.name) from exc

    async def _select_providers(self, *, organization_ids: Sequence[str]) -> list[ProviderRecord]:
        marks = ", ".join("?" for _ in organization_ids)
        async with self.db.execute(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers WHERE organization_id IN ({marks}) "
            "ORDER BY organization_id, name",
            tuple(organization_ids),
        ) as cur:
            return [_provider(row) for row in await cur.fetchall()]

    async def _delete_provider(self, *, organization_id: str, name: str) -> bool:
        async with self.db.execute(
            "DELETE FROM providers WHERE organization_id = ? AND name = ?", (organization_id, name)
        ) as cur:
            return bool(cur.rowcount)

    async def _select_all_providers(self) -> list[ProviderRecord]:
        async with self.db.execute(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers ORDER BY organization_id, name"
        ) as cur:
            return [_provider(row) for row in await cur.fetchall()]

    async def _replace_provider_key(self, *, provider_id: str, old: str, new: str) -> bool:
        async with self.db.execute(
            "UPDATE providers SET api_key_encrypted = ? WHERE id = ? AND api_key_encrypted = ?",
            (new, provider_id, old),
        ) as cur:
            return bool(cur.rowcount)


async def _legacy_version(db: aiosqlite.Connection) -> int | None:
    """The version an older file kept in `auth_schema_version`, moved out of it (the table is
    dropped); None when the file has no such table. Inside the migration's transaction."""
    async with db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'auth_schema_version'"
    ) as cur:
        if await cur.fetchone() is None:
            return None
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM auth_schema_version") as cur:
        row = await cur.fetchone()
    await db.execute("DROP TABLE auth_schema_version")
    return int(row[0]) if row else 0
