"""Builds the auth store `LLMGW_KEY_STORE` names, and says where keys live.

Here, not in server/auth/store.py, so that the interface module does not import its own
backends (which import it): the same split as server/traces/factory.py.

The migration trap: before `LLMGW_KEY_STORE` existed, setting `LLMGW_POSTGRES_DSN` (for traces)
silently moved keys and BYOK providers to Postgres. Now keys stay in SQLite unless
`LLMGW_KEY_STORE=postgres`, so such an operator's keys would seem to vanish, and with an empty
store on loopback `LLMGW_AUTH=auto` would even turn authentication off. While `LLMGW_KEY_STORE`
is not set and `LLMGW_POSTGRES_DSN` is, `stranded_keys` looks (read-only) for keys in Postgres:
- Postgres holds keys or providers and the SQLite store holds none: the server refuses to start;
- both hold some: a warning (the operator started using SQLite on purpose, it seems);
- Postgres cannot be asked and the SQLite store is empty: the server refuses to start too (it
  cannot tell the first case from a fresh install); a warning when SQLite has keys.
`keys` commands print the same findings as warnings. Setting `LLMGW_KEY_STORE` (either value)
is the operator's choice and skips the check.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from server.auth.redact import redact_url
from server.auth.store import DEFAULT_CACHE_TTL, AuthStore

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger("llmgateway.auth")
# The check of the old Postgres location must not hold start-up for long when the database is
# slow or down (it is then the trace backend's problem, reported by its lane).
_PROBE_TIMEOUT = 5.0


def create_auth_store(settings: Settings, *, cache_ttl: float = DEFAULT_CACHE_TTL) -> AuthStore:
    """The store `LLMGW_KEY_STORE` names (default SQLite), not yet started.

    Each backend module is imported here, lazily, so an unused driver is never imported.
    """
    if _chose_postgres(settings):
        from server.auth.store_postgres import PostgresAuthStore

        return PostgresAuthStore(dsn=settings.postgres_dsn, cache_ttl=cache_ttl)
    from server.auth.store_sqlite import SqliteAuthStore

    return SqliteAuthStore(path=settings.sqlite_path, cache_ttl=cache_ttl)


def _chose_postgres(settings: Settings) -> bool:
    return settings.key_store == "postgres"


def key_store_location(settings: Settings) -> str:
    """`sqlite /abs/path.db` or `postgres postgresql://user:***@host/db` (never a password)."""
    if _chose_postgres(settings):
        return f"postgres {redact_url(settings.postgres_dsn)}"
    return f"sqlite {settings.sqlite_path}"


async def _postgres_key_counts(dsn: str) -> tuple[int, int]:
    """Active gateway keys and BYOK providers in Postgres; (0, 0) if its tables do not exist.

    Read-only: it creates nothing in a database that is only meant to hold traces.
    """
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=_PROBE_TIMEOUT)
    try:
        keys = providers = 0
        if await conn.fetchval("SELECT to_regclass('gateway_keys') IS NOT NULL"):
            keys = int(await conn.fetchval("SELECT COUNT(*) FROM gateway_keys WHERE revoked_at IS NULL"))
        if await conn.fetchval("SELECT to_regclass('providers') IS NOT NULL"):
            providers = int(await conn.fetchval("SELECT COUNT(*) FROM providers"))
        return keys, providers
    finally:
        await conn.close()


async def stranded_keys(settings: Settings, store: AuthStore) -> tuple[str, bool] | None:
    """(message, SQLite store is empty) when Postgres holds keys or providers the SQLite store
    does not use, or cannot be asked; None when there is nothing to say. The caller refuses to
    start when the store is empty (see the module docstring)."""
    if settings.key_store or not settings.postgres_dsn:
        return None
    try:
        keys, providers = await asyncio.wait_for(_postgres_key_counts(settings.postgres_dsn), _PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any driver error or the timeout: cannot tell
        empty = not await store.has_keys() and not await store.all_providers()
        message = (
            f"cannot check LLMGW_POSTGRES_DSN for gateway keys of an older version ({type(exc).__name__}), "
            f"which kept keys in Postgres whenever LLMGW_POSTGRES_DSN was set; keys are read from "
            f"{key_store_location(settings)}. Set LLMGW_KEY_STORE=sqlite or LLMGW_KEY_STORE=postgres "
            "to choose"
        )
        return message, empty
    if not keys and not providers:
        return None
    empty = not await store.has_keys() and not await store.all_providers()
    message = (
        f"LLMGW_POSTGRES_DSN holds {keys} active gateway keys and {providers} BYOK providers, but keys "
        f"are read from the SQLite store ({settings.sqlite_path}) unless LLMGW_KEY_STORE says otherwise "
        "(older versions kept keys in Postgres whenever LLMGW_POSTGRES_DSN was set): set "
        "LLMGW_KEY_STORE=postgres to keep using them, or LLMGW_KEY_STORE=sqlite to use SQLite"
    )
    return message, empty
