"""Keys that do not authenticate cost no database query per call (server/auth/store.py): an
unknown id is remembered for NEGATIVE_TTL, a wrong secret is answered by the cached row, a key
revoked elsewhere becomes a tombstone, concurrent lookups of one id share one query, and lookups
of never-seen ids are bounded in concurrency, never in front of a known key. A real SQLite store,
its queries counted."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from server.auth import store as store_module
from server.auth.store import NEGATIVE_TTL, UNKNOWN_LOOKUPS, KeyRow, hash_key, utcnow
from server.auth.store_sqlite import SqliteAuthStore


class CountingStore(SqliteAuthStore):
    """SQLite, with every key lookup counted (and optionally slowed, to overlap them)."""

    def __init__(self, path: str, clock: list[float], delay: float = 0.0) -> None:
        super().__init__(path=path)
        self._clock = lambda: clock[0]
        self.lookups = 0
        self.running = 0
        self.most_running = 0
        self.delay = delay

    async def _fetch_key(self, *, key_id: str) -> KeyRow | None:
        self.lookups += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await super()._fetch_key(key_id=key_id)
        finally:
            self.running -= 1


def random_token() -> str:
    return f"llmgw_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


async def test_an_unknown_key_is_looked_up_at_most_once_a_second(tmp_path: Path) -> None:
    clock = [1000.0]
    async with CountingStore(str(tmp_path / "k.db"), clock) as store:
        token = random_token()
        for _ in range(50):
            assert await store.authenticate(token=token) is None
        assert store.lookups == 1
        clock[0] += NEGATIVE_TTL
        assert await store.authenticate(token=token) is None
        assert store.lookups == 2  # looked up again once the second is over


async def test_a_key_created_elsewhere_after_its_id_was_refused_works_within_the_negative_ttl(
    tmp_path: Path,
) -> None:
    """The documented bound: only an id presented here before it existed waits, and at most 1 s."""
    clock = [1000.0]
    async with (
        CountingStore(str(tmp_path / "k.db"), clock) as replica,
        SqliteAuthStore(path=str(tmp_path / "k.db")) as elsewhere,
    ):
        key_id = secrets.token_hex(8)
        token = f"llmgw_{key_id}_{secrets.token_urlsafe(32)}"
        assert await replica.authenticate(token=token) is None
        await elsewhere._insert_key(  # noqa: SLF001 - a key with the id just refused
            row=KeyRow(key_id, hash_key(token), "acme", "", False, utcnow())
        )
        clock[0] += NEGATIVE_TTL / 2
        assert await replica.authenticate(token=token) is None  # within the documented second
        clock[0] += NEGATIVE_TTL / 2
        actor = await replica.authenticate(token=token)
        assert actor is not None and actor.organization_id == "acme"
        # And a fresh key made elsewhere (a new random id) works here on its first call.
        _, fresh = await elsewhere.create_key(organization_id="acme")
        assert await replica.authenticate(token=fresh) is not None


async def test_wrong_secrets_for_a_real_key_id_are_answered_by_the_cached_row(tmp_path: Path) -> None:
    clock = [1000.0]
    async with CountingStore(str(tmp_path / "k.db"), clock) as store:
        key_id, token = await store.create_key(organization_id="acme")
        for _ in range(30):
            assert await store.authenticate(token=f"llmgw_{key_id}_{secrets.token_urlsafe(32)}") is None
        assert store.lookups == 1
        assert await store.authenticate(token=token) is not None
        assert store.lookups == 1  # the real key, from the same cached row


async def test_a_key_revoked_elsewhere_is_never_looked_up_again(tmp_path: Path) -> None:
    clock = [1000.0]
    async with (
        CountingStore(str(tmp_path / "k.db"), clock) as replica,
        SqliteAuthStore(path=str(tmp_path / "k.db")) as cli,
    ):
        key_id, token = await cli.create_key(organization_id="acme")
        assert await replica.authenticate(token=token) is not None
        assert await cli.revoke_key(key_id=key_id)
        clock[0] += replica.cache_ttl
        assert await replica.authenticate(token=token) is None
        lookups = replica.lookups
        for _ in range(20):
            clock[0] += replica.cache_ttl
            assert await replica.authenticate(token=token) is None
        assert replica.lookups == lookups


async def test_concurrent_lookups_share_one_query_and_floods_of_unknown_ids_are_bounded(
    tmp_path: Path,
) -> None:
    clock = [1000.0]
    async with CountingStore(str(tmp_path / "k.db"), clock, delay=0.05) as store:
        same = random_token()
        assert await asyncio.gather(*(store.authenticate(token=same) for _ in range(20))) == [None] * 20
        assert store.lookups == 1
        # A known key whose cache entry expired is looked up at once, in front of a flood of
        # random ids (at most UNKNOWN_LOOKUPS of them query the database at a time).
        _, known = await store.create_key(organization_id="acme")
        assert await store.authenticate(token=known) is not None
        clock[0] += store.cache_ttl
        store.lookups = store.most_running = 0
        flood = [asyncio.ensure_future(store.authenticate(token=random_token())) for _ in range(40)]
        await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        assert await store.authenticate(token=known) is not None
        known_took = asyncio.get_running_loop().time() - started
        assert await asyncio.gather(*flood) == [None] * 40
        assert store.lookups == 41
        assert store.most_running <= UNKNOWN_LOOKUPS + 1  # the flood's, plus the known key's own
        assert known_took < 0.05 * 3, known_took  # not behind 40 / 4 queued lookups (0.5 s)


async def test_the_negative_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    async with CountingStore(str(tmp_path / "k.db"), clock) as store:
        monkeypatch.setattr(store_module, "_CACHE_MAX_ENTRIES", 100)
        for _ in range(250):
            await store.authenticate(token=random_token())
        assert len(store._unknown) == 100  # noqa: SLF001
