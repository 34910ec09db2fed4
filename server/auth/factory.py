"""Builds the auth store `LLMGW_KEY_STORE` names, and says where keys live.

Here, not in server/auth/store.py, so that the interface module does not import its own
backends (which import it): the same split as server/traces/factory.py.

The migration trap: before `LLMGW_KEY_STORE` existed, setting `LLMGW_POSTGRES_DSN` (for traces)
silently moved keys and BYOK providers to Postgres. Now keys stay in SQLite unless
`LLMGW_KEY_STORE=postgres`, so such an operator's keys would seem to vanish, and with an empty
store on loopback `LLMGW_AUTH=auto` would even turn authentication off. `stranded_keys` finds
that case: the server refuses to start, `keys` commands print a warning.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from server.auth.store import DEFAULT_CACHE_TTL, AuthStore
from server.traces.base import redact_url

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
    if settings.key_store == "postgres":
        from server.auth.store_postgres import PostgresAuthStore

        return PostgresAuthStore(dsn=settings.postgres_dsn, cache_ttl=cache_ttl)
    from server.auth.store_sqlite import SqliteAuthStore

    return SqliteAuthStore(path=settings.sqlite_path, cache_ttl=cache_ttl)


def key_store_location(settings: Settings) -> str:
    """`sqlite /abs/path.db` or `postgres postgresql://user:***@host/db` (never a password)."""
    if settings.key_store == "postgres":
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
    """(message, store_is_empty) when Postgres holds keys or providers the SQLite store does not
    use; None when there is nothing to say (or Postgres cannot be asked: logged)."""
    if settings.key_store != "sqlite" or not settings.postgres_dsn:
        return None
    try:
        keys, providers = await asyncio.wait_for(
            _postgres_key_counts(settings.postgres_dsn), _PROBE_TIMEOUT * 2
        )
    except Exception as exc:  # noqa: BLE001 - any driver error: the check is advisory then
        log.warning(
            "could not check LLMGW_POSTGRES_DSN for keys of an older version (%s); "
            "keys and BYOK providers are read from %s",
            type(exc).__name__,
            key_store_location(settings),
        )
        return None
    if not keys and not providers:
        return None
    empty = not await store.has_keys() and not await store.all_providers()
    message = (
        f"LLMGW_POSTGRES_DSN holds {keys} active gateway keys and {providers} BYOK providers, but keys "
        f"are now read from LLMGW_KEY_STORE=sqlite ({settings.sqlite_path}); set LLMGW_KEY_STORE=postgres "
        "to keep using them (older versions kept keys in Postgres whenever LLMGW_POSTGRES_DSN was set)"
    )
    return message, empty
