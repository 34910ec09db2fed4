"""The auth store in PostgreSQL (`LLMGW_POSTGRES_DSN`), via an asyncpg pool.

Same tables and migration counter as the SQLite store (`gateway_keys`, `providers`,
`auth_schema_version`). Migrations hold a transaction-scoped advisory lock, so concurrent
starts migrate exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from server.auth.store import (
    DEFAULT_CACHE_TTL,
    AuthStore,
    KeyRow,
    ProviderAlreadyExists,
    ProviderRecord,
    utcnow,
)

# Arbitrary constant identifying "auth schema migration" among advisory locks.
_MIGRATION_LOCK = 0x6C6C6D6777_01

# Each entry migrates from version i to i + 1. Append only; never edit a released entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE gateway_keys (
            key_id          TEXT PRIMARY KEY,
            key_hash        TEXT NOT NULL,
            organization_id TEXT NOT NULL,
            user_id         TEXT NOT NULL DEFAULT '',
            is_admin        BOOLEAN NOT NULL DEFAULT FALSE,
            created_at      TIMESTAMPTZ NOT NULL,
            revoked_at      TIMESTAMPTZ
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
            created_at        TIMESTAMPTZ NOT NULL,
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
            requests_per_minute BIGINT,
            tokens_per_minute   BIGINT,
            spend_per_day       BIGINT,
            spend_per_month     BIGINT,
            updated_at          TIMESTAMPTZ NOT NULL,
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


def _key_row(row: Any) -> KeyRow:
    return KeyRow(
        key_id=row["key_id"],
        key_hash=row["key_hash"],
        organization_id=row["organization_id"],
        user_id=row["user_id"],
        is_admin=bool(row["is_admin"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _provider(row: Any) -> ProviderRecord:
    return ProviderRecord(
        id=row["id"],
        organization_id=row["organization_id"],
        name=row["name"],
        endpoint_type=row["endpoint_type"],
        base_url=row["base_url"],
        api_key_encrypted=row["api_key_encrypted"],
        api_key_last4=row["api_key_last4"],
        created_at=row["created_at"],
    )


class PostgresAuthStore(AuthStore):
    """Gateway keys and providers in PostgreSQL. Pass `pool` to share one with the trace backend."""

    name = "postgres"

    def __init__(self, *, dsn: str = "", pool: Any = None, cache_ttl: float = DEFAULT_CACHE_TTL) -> None:
        super().__init__(cache_ttl=cache_ttl)
        if not dsn and pool is None:
            raise ValueError("PostgresAuthStore needs a dsn or a pool")
        self._dsn = dsn
        self._pool: Any = pool
        self._owns_pool = pool is None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PostgresAuthStore.start() was not called")
        return self._pool

    async def start(self) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS auth_schema_version (version INTEGER NOT NULL)")
            current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM auth_schema_version"))
            for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO auth_schema_version (version) VALUES ($1)", version)

    async def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _insert_key(self, *, row: KeyRow) -> None:
        await self.pool.execute(
            f"INSERT INTO gateway_keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            row.key_id,
            row.key_hash,
            row.organization_id,
            row.user_id,
            row.is_admin,
            row.created_at,
            row.revoked_at,
        )

    async def _fetch_key(self, *, key_id: str) -> KeyRow | None:
        row = await self.pool.fetchrow(f"SELECT {_KEY_COLUMNS} FROM gateway_keys WHERE key_id = $1", key_id)
        return _key_row(row) if row is not None else None

    async def _select_keys(self, *, organization_id: str | None) -> list[KeyRow]:
        if organization_id is None:
            rows = await self.pool.fetch(
                f"SELECT {_KEY_COLUMNS} FROM gateway_keys ORDER BY created_at, key_id"
            )
        else:
            rows = await self.pool.fetch(
                f"SELECT {_KEY_COLUMNS} FROM gateway_keys WHERE organization_id = $1 "
                "ORDER BY created_at, key_id",
                organization_id,
            )
        return [_key_row(row) for row in rows]

    async def _mark_revoked(self, *, key_id: str, at: datetime) -> bool:
        status = await self.pool.execute(
            "UPDATE gateway_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL", at, key_id
        )
        return str(status) != "UPDATE 0"

    async def _count_active_keys(self) -> int:
        return int(await self.pool.fetchval("SELECT COUNT(*) FROM gateway_keys WHERE revoked_at IS NULL"))

    async def _upsert_limits(self, *, scope: str, subject: str, values: tuple[int | None, ...]) -> None:
        if all(v is None for v in values):
            await self.pool.execute(
                "DELETE FROM gateway_limits WHERE scope = $1 AND subject = $2", scope, subject
            )
            return
        await self.pool.execute(
            f"INSERT INTO gateway_limits ({_LIMIT_COLUMNS}, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (scope, subject) DO UPDATE SET requests_per_minute = excluded.requests_per_minute,"
            " tokens_per_minute = excluded.tokens_per_minute, spend_per_day = excluded.spend_per_day,"
            " spend_per_month = excluded.spend_per_month, updated_at = excluded.updated_at",
            scope,
            subject,
            *values,
            utcnow(),
        )

    async def _fetch_limits(self, *, scope: str, subject: str) -> tuple[int | None, ...] | None:
        row = await self.pool.fetchrow(
            f"SELECT {_LIMIT_COLUMNS} FROM gateway_limits WHERE scope = $1 AND subject = $2", scope, subject
        )
        return tuple(row[2:]) if row is not None else None

    async def _insert_provider(self, *, record: ProviderRecord) -> None:
        try:
            await self.pool.execute(
                f"INSERT INTO providers ({_PROVIDER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                record.id,
                record.organization_id,
                record.name,
                record.endpoint_type,
                record.base_url,
                record.api_key_encrypted,
                record.api_key_last4,
                record.created_at,
            )
        except asyncpg.UniqueViolationError as exc:
            raise ProviderAlreadyExists(organization_id=record.organization_id, name=record.name) from exc

    async def _select_providers(self, *, organization_ids: Sequence[str]) -> list[ProviderRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers WHERE organization_id = ANY($1::text[]) "
            "ORDER BY organization_id, name",
            list(organization_ids),
        )
        return [_provider(row) for row in rows]

    async def _delete_provider(self, *, organization_id: str, name: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM providers WHERE organization_id = $1 AND name = $2", organization_id, name
        )
        return str(status) != "DELETE 0"

    async def _select_all_providers(self) -> list[ProviderRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers ORDER BY organization_id, name"
        )
        return [_provider(row) for row in rows]

    async def _replace_provider_key(self, *, provider_id: str, old: str, new: str) -> bool:
        status = await self.pool.execute(
            "UPDATE providers SET api_key_encrypted = $1 WHERE id = $2 AND api_key_encrypted = $3",
            new,
            provider_id,
            old,
        )
        return str(status) != "UPDATE 0"
