"""Cache races of the auth store (issue 12, item 4 and its class): lookups in flight during a change.

Each test pauses a real SQLite store's lookup at an `asyncio.Event` after it has read the
database, makes the change (revoke a key, delete or create a provider), then lets the lookup
finish: what it read predates the change, and it must neither be returned as current nor cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from server.auth.store import KeyRow, ProviderRecord
from server.auth.store_sqlite import SqliteAuthStore

WAIT = 10.0  # bound on every wait; the events fire at once when the code is right


class PausingStore(SqliteAuthStore):
    """A SQLite store whose next key or provider lookup stops after reading, until released."""

    def __init__(self, path: str) -> None:
        super().__init__(path=path)
        self.pause_keys = False
        self.pause_providers = False
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    async def _fetch_key(self, *, key_id: str) -> KeyRow | None:
        row = await super()._fetch_key(key_id=key_id)
        if self.pause_keys:
            self.pause_keys = False
            self.read_done.set()
            await self.release.wait()
        return row

    async def _select_providers(self, *, organization_ids: Sequence[str]) -> list[ProviderRecord]:
        rows = await super()._select_providers(organization_ids=organization_ids)
        if self.pause_providers:
            self.pause_providers = False
            self.read_done.set()
            await self.release.wait()
        return rows


async def _provider(store: SqliteAuthStore, org: str, name: str) -> None:
    await store.create_provider(
        organization_id=org,
        name=name,
        endpoint_type="openai",
        base_url=f"https://{name}.example.com/v1",
        api_key_encrypted="v2$not-used-here",
        api_key_last4="",
    )


async def test_authentication_in_flight_during_revoke_does_not_resurrect_the_key(tmp_path: Path) -> None:
    async with PausingStore(str(tmp_path / "gw.db")) as store:
        key_id, plaintext = await store.create_key(organization_id="acme")
        store.pause_keys = True
        in_flight = asyncio.create_task(store.authenticate(token=plaintext))
        await asyncio.wait_for(store.read_done.wait(), WAIT)  # it has read the row: not yet revoked
        assert await store.revoke_key(key_id=key_id)
        store.release.set()
        # `revoke` has returned: neither the call in flight nor any later one may accept the key.
        assert await asyncio.wait_for(in_flight, WAIT) is None
        assert await store.authenticate(token=plaintext) is None
        assert await store.authenticate(token=plaintext) is None


async def test_provider_lookup_in_flight_during_delete_does_not_cache_the_deleted_provider(
    tmp_path: Path,
) -> None:
    async with PausingStore(str(tmp_path / "gw.db")) as store:
        await _provider(store, "acme", "mine")
        store.pause_providers = True
        in_flight = asyncio.create_task(store.get_provider(organization_id="acme", name="mine"))
        await asyncio.wait_for(store.read_done.wait(), WAIT)
        assert await store.delete_provider(organization_id="acme", name="mine")
        store.release.set()
        await asyncio.wait_for(in_flight, WAIT)  # began before the delete: may see the old row
        # DeleteProvider has returned: its key must not be used again from the cache.
        assert await store.get_provider(organization_id="acme", name="mine") is None
        assert await store.byok_base_urls(organization_id="acme") == ()


async def test_provider_lookup_in_flight_during_create_does_not_hide_the_new_provider(
    tmp_path: Path,
) -> None:
    async with PausingStore(str(tmp_path / "gw.db")) as store:
        store.pause_providers = True
        in_flight = asyncio.create_task(store.get_provider(organization_id="acme", name="new"))
        await asyncio.wait_for(store.read_done.wait(), WAIT)
        await _provider(store, "acme", "new")
        store.release.set()
        assert await asyncio.wait_for(in_flight, WAIT) is None  # read before the create
        found = await store.get_provider(organization_id="acme", name="new")
        assert found is not None and found.name == "new"
