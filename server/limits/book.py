"""The limits of keys and organizations, stored with the keys and cached for the request path.

A lookup is cached for `cache_ttl` seconds (the auth store's, 5 s by default): a limit set on
one server (or with the CLI) applies on every other within that time, and at once on the
server whose admin RPC set it.
"""

from __future__ import annotations

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

    async def get(self, scope: Scope, subject: str) -> Limits:
        key = (scope, subject)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        values = await self._store._fetch_limits(scope=scope, subject=subject)
        limits = Limits(*values) if values is not None else NO_LIMITS
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = (now + self._ttl, limits)
        return limits

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
        self._cache.pop((scope, subject), None)
