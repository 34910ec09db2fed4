"""The limits of keys and organizations, stored with the keys and cached for the request path.

A lookup is cached for `cache_ttl` seconds (the auth store's, 5 s by default): a limit set on
one server (or with the CLI) applies on every other within that time, and at once on the
server whose admin RPC set it. Calls that miss the cache at the same time share one lookup.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from server.auth.store import AuthStore
from server.limits.model import NO_LIMITS, Limits, Scope

_MAX_ENTRIES = 100_000


class LimitsBook:
    def __init__(
        self, store: AuthStore, *, cache_ttl: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._ttl = store.cache_ttl if cache_ttl is None else cache_ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Limits]] = {}
        # Lookups under way: the calls that miss the cache together (a burst of new streams, or
        # every call in flight when an entry expires) share one store query instead of one each.
        self._loading: dict[tuple[str, str], asyncio.Task[Limits]] = {}
        self._generation = 0  # bumped by `set`: a lookup begun before it is not cached

    async def get(self, scope: Scope, subject: str) -> Limits:
        key = (scope, subject)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.get_running_loop().create_task(self._load(key))
            self._loading[key] = loading
            loading.add_done_callback(functools.partial(self._loaded, key))
        # Shielded: a caller cancelled while it waits does not cancel the others' lookup.
        return await asyncio.shield(loading)

    async def _load(self, key: tuple[str, str]) -> Limits:
        generation, now = self._generation, self._clock()
        values = await self._store._fetch_limits(scope=key[0], subject=key[1])
        limits = Limits(*values) if values is not None else NO_LIMITS
        if generation == self._generation:  # no `set` since it began: not stale
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = (now + self._ttl, limits)
        return limits

    def _loaded(self, key: tuple[str, str], task: asyncio.Task[Limits]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have been cancelled

    def known_unlimited(self, key_id: str, organization_id: str) -> bool:
        """True only when the cache knows that neither the key ("": none) nor its organization
        has a limit (every call asks: one clock read, two lookups)."""
        now, cache = self._clock(), self._cache
        org = cache.get(("org", organization_id))
        if org is None or org[0] <= now or not org[1].empty:
            return False
        if not key_id:
            return True
        key = cache.get(("key", key_id))
        return key is not None and key[0] > now and key[1].empty

    def cached(self, scope: Scope, subject: str) -> Limits | None:
        """The cached limits when still fresh, else None (the request path's fast lookup)."""
        cached = self._cache.get((scope, subject))
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        return None

    async def set(self, scope: Scope, subject: str, limits: Limits) -> None:
        values = (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.spend_per_day,
            limits.spend_per_month,
        )
        await self._store._upsert_limits(scope=scope, subject=subject, values=values)
        self._generation += 1
        self._cache.pop((scope, subject), None)
        self._loading.pop((scope, subject), None)  # the next lookup reads what was just set
