"""Gateway keys and BYOK providers in SQLite (server.auth.store, server.auth.store_sqlite)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.auth import store_sqlite
from server.auth.actor import Actor
from server.auth.factory import create_auth_store
from server.auth.store import (
    AuthStore,
    ProviderAlreadyExists,
    hash_key,
    parse_key_id,
)
from server.auth.store_sqlite import SqliteAuthStore
from server.config import Settings
from server.errors import InvalidRequest
from server.traces import sqlite as trace_sqlite
from server.traces.base import TraceQuery, TraceRecord, new_trace_id
from server.traces.sqlite import SQLiteTraceBackend


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "gateway.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteAuthStore]:
    s = SqliteAuthStore(path=str(db_path))
    await s.start()
    yield s
    await s.close()


def test_factory_picks_sqlite_without_dsn(tmp_path: Path) -> None:
    s = create_auth_store(Settings(sqlite_path=str(tmp_path / "x.db")))
    assert isinstance(s, SqliteAuthStore)


def test_factory_keeps_keys_in_sqlite_when_only_a_dsn_is_set(tmp_path: Path) -> None:
    # LLMGW_POSTGRES_DSN is for traces: it no longer moves keys (issue 15).
    s = create_auth_store(
        Settings(sqlite_path=str(tmp_path / "x.db"), postgres_dsn="postgresql://u@127.0.0.1:1/db")
    )
    assert isinstance(s, SqliteAuthStore)


def test_factory_picks_postgres_when_the_key_store_says_so() -> None:
    from server.auth.store_postgres import PostgresAuthStore

    s = create_auth_store(Settings(key_store="postgres", postgres_dsn="postgresql://u@127.0.0.1:1/db"))
    assert isinstance(s, PostgresAuthStore)


async def test_key_format_and_authenticate(store: SqliteAuthStore) -> None:
    key_id, plaintext = await store.create_key(organization_id="acme", user_id="ann", is_admin=True)
    prefix, kid, secret = plaintext.split("_", 2)
    assert (prefix, kid) == ("llmgw", key_id)
    assert len(secret) >= 40
    assert parse_key_id(plaintext) == key_id
    actor = await store.authenticate(token=plaintext)
    assert actor == Actor(organization_id="acme", user_id="ann", is_admin=True, key_id=key_id)


async def test_wrong_and_malformed_keys(store: SqliteAuthStore) -> None:
    key_id, plaintext = await store.create_key(organization_id="acme")
    assert await store.authenticate(token=plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert await store.authenticate(token="") is None
    assert await store.authenticate(token="Bearer " + plaintext) is None
    assert await store.authenticate(token=f"llmgw_{key_id}_short") is None
    assert await store.authenticate(token=f"llmgw_{'0' * 16}_{'x' * 43}") is None
    # A wrong secret is refused even while the right one is cached.
    assert await store.authenticate(token=plaintext) is not None
    assert await store.authenticate(token=plaintext[:-2] + "zz") is None


async def test_two_keys_are_different(store: SqliteAuthStore) -> None:
    a = await store.create_key(organization_id="acme")
    b = await store.create_key(organization_id="acme")
    assert a[0] != b[0] and a[1] != b[1]


async def test_create_key_needs_an_organization(store: SqliteAuthStore) -> None:
    with pytest.raises(InvalidRequest):
        await store.create_key(organization_id="")


async def test_plaintext_never_in_database_file(store: SqliteAuthStore, db_path: Path) -> None:
    plaintexts = [(await store.create_key(organization_id="acme"))[1] for _ in range(3)]
    await store.close()
    raw = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))
    for plaintext in plaintexts:
        _, _, secret = plaintext.split("_", 2)
        assert plaintext.encode() not in raw
        assert secret.encode() not in raw
        assert hash_key(plaintext).encode() in raw
    await store.start()


async def test_list_and_revoke(store: SqliteAuthStore) -> None:
    k1, p1 = await store.create_key(organization_id="acme", user_id="ann", is_admin=True)
    k2, _ = await store.create_key(organization_id="beta")
    assert [k.key_id for k in await store.list_keys()] == [k1, k2]
    listed = await store.list_keys(organization_id="acme")
    assert [(k.key_id, k.user_id, k.is_admin, k.revoked) for k in listed] == [(k1, "ann", True, False)]
    assert "key_hash" not in repr(listed[0])
    assert await store.has_keys()

    assert await store.authenticate(token=p1) is not None
    assert await store.revoke_key(key_id=k1) is True
    assert await store.authenticate(token=p1) is None  # the revoking process forgets at once
    assert await store.revoke_key(key_id=k1) is False  # already revoked
    assert await store.revoke_key(key_id="nope") is False
    assert (await store.list_keys(organization_id="acme"))[0].revoked
    assert await store.has_keys()  # k2 is still active
    await store.revoke_key(key_id=k2)
    assert not await store.has_keys()


async def test_revocation_elsewhere_takes_effect_within_ttl(db_path: Path) -> None:
    clock = FakeClock()
    server = SqliteAuthStore(path=str(db_path))
    server._clock = clock  # noqa: SLF001 - injecting time for the test
    cli = SqliteAuthStore(path=str(db_path))
    async with server, cli:
        key_id, plaintext = await cli.create_key(organization_id="acme")
        assert await server.authenticate(token=plaintext) is not None
        assert await cli.revoke_key(key_id=key_id)
        clock.now += server.cache_ttl / 2
        assert await server.authenticate(token=plaintext) is not None  # still cached: the documented bound
        clock.now += server.cache_ttl
        assert await server.authenticate(token=plaintext) is None


async def test_new_key_works_immediately_on_a_running_server(db_path: Path) -> None:
    async with SqliteAuthStore(path=str(db_path)) as server, SqliteAuthStore(path=str(db_path)) as cli:
        assert await server.authenticate(token=f"llmgw_{'a' * 16}_{'b' * 43}") is None
        _, plaintext = await cli.create_key(organization_id="acme")
        assert await server.authenticate(token=plaintext) is not None


async def test_migration_is_idempotent_and_shares_the_trace_stores_version_table(db_path: Path) -> None:
    """One scheme in the file: the trace store's row and the auth store's in `schema_version`."""
    db_path.parent.mkdir(parents=True)
    traces = SQLiteTraceBackend(str(db_path))
    await traces.start()
    await traces.close()
    for _ in range(2):
        async with SqliteAuthStore(path=str(db_path)) as s:
            await s.create_key(organization_id="acme")
    with sqlite3.connect(db_path) as conn:
        assert dict(conn.execute("SELECT component, version FROM schema_version")) == {
            "provider_traces": len(trace_sqlite.MIGRATIONS),
            "gateway_auth": len(store_sqlite.MIGRATIONS),
        }
        assert conn.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE '%schema_version'"
        ).fetchall() == [("schema_version",)]
        assert conn.execute("SELECT COUNT(*) FROM gateway_keys").fetchone() == (2,)


@pytest.mark.parametrize("old_version", [1, len(store_sqlite.MIGRATIONS)])
async def test_a_file_with_the_old_auth_version_table_opens_with_keys_and_traces_intact(
    db_path: Path, old_version: int
) -> None:
    """Files made before one scheme kept the auth store's count in `auth_schema_version` (one row
    per applied migration). Such a file opens: the count moves to `schema_version`, pending
    migrations run, the old table is dropped, and keys, providers and traces are all still there."""
    db_path.parent.mkdir(parents=True)
    traces = SQLiteTraceBackend(str(db_path))
    await traces.start()
    record = TraceRecord(
        id=new_trace_id(), created_at=datetime.now(UTC), organization_id="acme", step_id="step-old"
    )
    await traces.write_batch(records=[record])
    await traces.close()
    async with SqliteAuthStore(path=str(db_path)) as old:
        key_id, plaintext = await old.create_key(organization_id="acme", is_admin=True)
        await _provider(old, "acme", "mine")
    # What the old code left: no `gateway_auth` row, its own table, the tables of `old_version`.
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM schema_version WHERE component = 'gateway_auth'")
        conn.execute("CREATE TABLE auth_schema_version (version INTEGER NOT NULL)")
        conn.executemany(
            "INSERT INTO auth_schema_version (version) VALUES (?)", [(v,) for v in range(1, old_version + 1)]
        )
        if old_version < 2:
            conn.execute("DROP TABLE gateway_limits")

    for _ in range(2):  # and a second start changes nothing
        async with SqliteAuthStore(path=str(db_path)) as new:
            actor = await new.authenticate(token=plaintext)
            assert actor is not None and actor.key_id == key_id and actor.is_admin
            provider = await new.get_provider(organization_id="acme", name="mine")
            assert provider is not None and provider.base_url == "https://llm.example.com/v1"
    with sqlite3.connect(db_path) as conn:
        assert dict(conn.execute("SELECT component, version FROM schema_version")) == {
            "provider_traces": len(trace_sqlite.MIGRATIONS),
            "gateway_auth": len(store_sqlite.MIGRATIONS),
        }
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name = 'auth_schema_version'").fetchall() == []
        )
        assert conn.execute("SELECT COUNT(*) FROM gateway_limits").fetchone() == (0,)
    traces = SQLiteTraceBackend(str(db_path))
    await traces.start()
    try:
        (found,) = await traces.list(query=TraceQuery(organization_id="acme"))
    finally:
        await traces.close()
    assert (found.id, found.step_id) == (record.id, "step-old")


async def _provider(
    store: AuthStore, org: str, name: str, base_url: str = "https://llm.example.com/v1"
) -> None:
    await store.create_provider(
        organization_id=org,
        name=name,
        endpoint_type="openai",
        base_url=base_url,
        api_key_encrypted=f"enc-{org}-{name}",
        api_key_last4="wxyz",
    )


async def test_provider_crud(store: SqliteAuthStore) -> None:
    record = await store.create_provider(
        organization_id="acme",
        name="mine",
        endpoint_type="openai",
        base_url="https://llm.example.com/v1",
        api_key_encrypted="ENCRYPTED",
        api_key_last4="wxyz",
    )
    assert record.id.startswith("provider-") and record.created_at.tzinfo is not None
    assert "ENCRYPTED" not in repr(record)
    [listed] = await store.list_providers(organization_id="acme")
    assert listed == record
    assert await store.get_provider(organization_id="acme", name="mine") == record
    assert await store.get_provider(organization_id="beta", name="mine") is None
    assert await store.list_providers(organization_id="beta") == []
    with pytest.raises(ProviderAlreadyExists):
        await _provider(store, "acme", "mine")
    await _provider(store, "beta", "mine")  # unique per organization only
    assert await store.delete_provider(organization_id="beta", name="mine") is True
    assert await store.delete_provider(organization_id="beta", name="mine") is False
    assert await store.get_provider(organization_id="acme", name="mine") == record


async def test_organization_providers_shadow_global_ones(store: SqliteAuthStore) -> None:
    await _provider(store, "", "shared", "https://global.example.com/v1")
    await _provider(store, "acme", "shared", "https://acme.example.com/v1")
    acme = await store.get_provider(organization_id="acme", name="shared")
    beta = await store.get_provider(organization_id="beta", name="shared")
    assert acme is not None and acme.organization_id == "acme"
    assert beta is not None and beta.is_global
    assert [p.organization_id for p in await store.list_providers(organization_id="beta")] == []
    assert [
        p.organization_id for p in await store.list_providers(organization_id="beta", include_global=True)
    ] == [""]
    assert set(await store.byok_base_urls(organization_id="acme")) == {
        "https://global.example.com/v1",
        "https://acme.example.com/v1",
    }
    # An organization cannot delete a global provider.
    assert await store.delete_provider(organization_id="beta", name="shared") is False
    assert await store.get_provider(organization_id="beta", name="shared") is not None


async def test_provider_cache_is_invalidated_locally(store: SqliteAuthStore) -> None:
    assert await store.byok_base_urls(organization_id="acme") == ()
    await _provider(store, "acme", "p")
    assert await store.byok_base_urls(organization_id="acme") == ("https://llm.example.com/v1",)
    await store.delete_provider(organization_id="acme", name="p")
    assert await store.get_provider(organization_id="acme", name="p") is None


async def test_a_provider_created_by_another_replica_is_found_at_once(db_path: Path) -> None:
    """Replica A cached acme's (empty) provider list; replica B creates one: A's next lookup of
    that name finds it without waiting out the cache. Known names still come from the cache."""
    clock = FakeClock()
    replica_a = SqliteAuthStore(path=str(db_path))
    replica_a._clock = clock  # noqa: SLF001 - injecting time for the test
    replica_b = SqliteAuthStore(path=str(db_path))
    async with replica_a, replica_b:
        assert await replica_a.get_provider(organization_id="acme", name="mine") is None  # cached: none
        await _provider(replica_b, "acme", "mine")
        found = await replica_a.get_provider(organization_id="acme", name="mine")
        assert found is not None and found.name == "mine"
        # A delete elsewhere keeps the documented bound: the known name is served from the cache.
        await replica_b.delete_provider(organization_id="acme", name="mine")
        assert await replica_a.get_provider(organization_id="acme", name="mine") is not None
        clock.now += replica_a.cache_ttl + 0.1
        assert await replica_a.get_provider(organization_id="acme", name="mine") is None
