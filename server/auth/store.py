"""Gateway keys and BYOK providers: the interface, the records and the caches.

Backends (`server.auth.store_sqlite.SqliteAuthStore`, `server.auth.store_postgres.PostgresAuthStore`)
implement a handful of storage primitives; the public, keyword-only API lives here so key
format, hashing and caching are written once. `server.auth.factory` builds the configured one.

Gateway keys look like `llmgw_<key_id>_<secret>`: `key_id` is 16 hex characters (public: it is
shown by `keys list` and used by `keys revoke`), `secret` is 256 random bits
(`secrets.token_urlsafe(32)`). Only SHA-256 of the whole key is stored; a plain fast hash is
enough because the secret has full entropy (nothing to brute-force), and the stored hash is
compared in constant time after a primary-key lookup by `key_id`.

Caching (the hot path must not hit the database on every call):
  * `authenticate` caches positive results for `cache_ttl` seconds (default 5). A revoked key is
    refused by the process that revoked it from the moment `revoke_key` is called (a tombstone
    is checked after every lookup, so an authentication already in flight cannot put the key
    back into the cache or return it), and by every other process (other workers, the CLI
    revoking against a running server) within `cache_ttl` seconds.
  * Presented keys that are not valid cost no query per call either (anyone who reaches the port
    can present one, and N replicas share one database): the cached row also answers a wrong
    secret for a known key id; a revoked row seen in the database becomes a tombstone (revocation
    is final); an unknown key id is remembered for `NEGATIVE_TTL` (1 s), so it is looked up again
    at most once a second per process: a key created elsewhere is refused here for at most 1 s,
    and only if its id was presented here in the second before it existed (ids are random: in
    practice, never). Concurrent lookups of one id share one query, and lookups of ids this
    process has never seen run at most `UNKNOWN_LOOKUPS` at a time, so a flood of random ids
    uses at most that many database connections per process and never delays a known key.
  * `get_provider` / `byok_base_urls` cache an organization's providers (its own and the global
    ones) for `cache_ttl` seconds, with the same bound for deletes made elsewhere; a name missing
    from the cached list is looked up again, so a provider created elsewhere is usable at once. A
    generation counter, bumped by every create/delete/rotation of this process, keeps a lookup
    that was already in flight from caching the list as it was before the change.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from server.auth.actor import Actor
from server.errors import AlreadyExists, InvalidRequest

KEY_PREFIX = "llmgw"
DEFAULT_CACHE_TTL = 5.0
NEGATIVE_TTL = 1.0  # an unknown key id is looked up again after this long
UNKNOWN_LOOKUPS = 4  # concurrent lookups of key ids not in the cache (unauthenticated callers)
GLOBAL_ORGANIZATION = ""  # providers of this organization are visible to every organization
_CACHE_MAX_ENTRIES = 10_000
_KEY_RE = re.compile(r"llmgw_([0-9a-f]{16})_([A-Za-z0-9_-]{20,})")


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A gateway key as listed: never its secret nor its hash."""

    key_id: str
    organization_id: str
    user_id: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A stored gateway key, hash included (backends return this to the base class only)."""

    key_id: str
    key_hash: str
    organization_id: str
    user_id: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    def public(self) -> GatewayKey:
        return GatewayKey(
            key_id=self.key_id,
            organization_id=self.organization_id,
            user_id=self.user_id,
            is_admin=self.is_admin,
            created_at=self.created_at,
            revoked_at=self.revoked_at,
        )


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A BYOK provider. `api_key_encrypted` is the crypto token; never send it to a client."""

    id: str
    organization_id: str
    name: str
    endpoint_type: str
    base_url: str
    api_key_encrypted: str = field(repr=False)
    api_key_last4: str
    created_at: datetime

    @property
    def is_global(self) -> bool:
        return self.organization_id == GLOBAL_ORGANIZATION


class ProviderAlreadyExists(AlreadyExists):
    """(organization, name) is taken."""

    def __init__(self, *, organization_id: str, name: str) -> None:
        super().__init__(
            f"a provider named {name!r} already exists in organization {organization_id!r}",
            metadata={"organization_id": organization_id, "name": name},
        )


def hash_key(plaintext: str) -> str:
    """SHA-256 hex digest of a gateway key (what the database stores)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_key_id(plaintext: str) -> str | None:
    """The key_id of a well-formed gateway key, or None (malformed keys never reach the database)."""
    match = _KEY_RE.fullmatch(plaintext)
    return match.group(1) if match else None


def new_gateway_key() -> tuple[str, str]:
    """A fresh (key_id, plaintext key)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def api_key_last4(api_key: str) -> str:
    """The last four characters shown for recognition; nothing for keys too short to spare them."""
    return api_key[-4:] if len(api_key) >= 12 else ""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _CachedActor:
    key_hash: str
    actor: Actor
    expires: float


class AuthStore(abc.ABC):
    """Gateway keys and BYOK providers. Call `start()` once before use and `close()` at the end."""

    name: str = "auth"

    def __init__(self, *, cache_ttl: float = DEFAULT_CACHE_TTL, clock: Callable[[], float] = time.monotonic):
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._actors: OrderedDict[str, _CachedActor] = OrderedDict()
        # Key ids this process revoked. Revocation is final, so a tombstone never goes stale; one
        # is a 16-character id, so even a process that revokes a million keys holds a few MB.
        self._revoked: set[str] = set()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # key id -> looked up again after
        self._lookups: dict[str, asyncio.Future[KeyRow | None]] = {}  # one query per key id at a time
        self._unknown_lookups: asyncio.Semaphore | None = None  # made in the running loop
        self._providers: OrderedDict[str, tuple[float, tuple[ProviderRecord, ...]]] = OrderedDict()
        self._providers_generation = 0

    # --- lifecycle --------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and migrate (idempotent, safe against concurrent starts)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- storage primitives (backends) ------------------------------------------------------

    @abc.abstractmethod
    async def _insert_key(self, *, row: KeyRow) -> None: ...

    @abc.abstractmethod
    async def _fetch_key(self, *, key_id: str) -> KeyRow | None: ...

    @abc.abstractmethod
    async def _select_keys(self, *, organization_id: str | None) -> list[KeyRow]: ...

    @abc.abstractmethod
    async def _mark_revoked(self, *, key_id: str, at: datetime) -> bool:
        """Set revoked_at on an active key; False when no active key has that id."""

    @abc.abstractmethod
    async def _count_active_keys(self) -> int: ...

    @abc.abstractmethod
    async def _insert_provider(self, *, record: ProviderRecord) -> None:
        """Insert, raising `ProviderAlreadyExists` on a duplicate (organization_id, name)."""

    @abc.abstractmethod
    async def _select_providers(self, *, organization_ids: Sequence[str]) -> list[ProviderRecord]:
        """Providers of any of these organizations, ordered by (organization_id, name)."""

    @abc.abstractmethod
    async def _delete_provider(self, *, organization_id: str, name: str) -> bool: ...

    @abc.abstractmethod
    async def _select_all_providers(self) -> list[ProviderRecord]:
        """Every provider of every organization, ordered by (organization_id, name)."""

    @abc.abstractmethod
    async def _replace_provider_key(self, *, provider_id: str, old: str, new: str) -> bool:
        """Set api_key_encrypted to `new` where it is still `old` (compare and set); False otherwise."""

    # Limits of a key or an organization (server.limits.book): (requests_per_minute,
    # tokens_per_minute, spend_per_day, spend_per_month), spend in nano-dollars, None = no limit.
    async def _upsert_limits(self, *, scope: str, subject: str, values: tuple[int | None, ...]) -> None:
        """Store the limits of (scope, subject); all None deletes them."""
        raise NotImplementedError(f"{self.name} stores no limits")

    async def _fetch_limits(self, *, scope: str, subject: str) -> tuple[int | None, ...] | None:
        raise NotImplementedError(f"{self.name} stores no limits")

    # --- gateway keys -----------------------------------------------------------------------

    async def get_key(self, *, key_id: str) -> GatewayKey | None:
        """One key (revoked or not) by its id, never its hash."""
        row = await self._fetch_key(key_id=key_id)
        return row.public() if row is not None else None

    async def create_key(
        self, *, organization_id: str, user_id: str = "", is_admin: bool = False
    ) -> tuple[str, str]:
        """Create a key; returns (key_id, plaintext key). The plaintext is never stored or shown again."""
        if not organization_id:
            raise InvalidRequest("a gateway key needs an organization", metadata={"field": "organization_id"})
        key_id, plaintext = new_gateway_key()
        row = KeyRow(
            key_id=key_id,
            key_hash=hash_key(plaintext),
            organization_id=organization_id,
            user_id=user_id,
            is_admin=is_admin,
            created_at=utcnow(),
        )
        await self._insert_key(row=row)
        return key_id, plaintext

    async def list_keys(self, *, organization_id: str | None = None) -> list[GatewayKey]:
        """Every key (revoked ones included), optionally of one organization, oldest first."""
        return [row.public() for row in await self._select_keys(organization_id=organization_id)]

    async def revoke_key(self, *, key_id: str) -> bool:
        """Revoke a key; False when there is no active key with that id.

        The tombstone goes in before the database write, so from this call on this process
        refuses the key, whatever authentications are in flight (and even if the write fails:
        refusing a key the operator meant to revoke is the safe side).
        """
        self._revoked.add(key_id)
        self._actors.pop(key_id, None)
        return await self._mark_revoked(key_id=key_id, at=utcnow())

    async def has_keys(self) -> bool:
        """True when at least one unrevoked key exists (for LLMGW_AUTH=auto)."""
        return await self._count_active_keys() > 0

    async def authenticate(self, *, token: str) -> Actor | None:
        """The actor of a presented gateway key, or None when it is malformed, unknown or revoked."""
        key_id = parse_key_id(token)
        if key_id is None:
            return None
        if key_id in self._revoked:
            return None
        digest = hash_key(token)
        now = self._clock()
        cached = self._actors.get(key_id)
        if cached is not None and cached.expires > now:
            return cached.actor if hmac.compare_digest(cached.key_hash, digest) else None
        unknown_until = self._unknown.get(key_id)
        if unknown_until is not None:
            if unknown_until > now:
                return None
            del self._unknown[key_id]
        row = await self._lookup(key_id, known=cached is not None)
        if key_id in self._revoked:
            # Revoked by this process while the lookup ran: the row may predate the revocation.
            return None
        if row is None:
            self._remember_unknown(key_id, now)
            return None
        if row.revoked_at is not None:
            self._revoked.add(key_id)  # revoked elsewhere: final, no query for it again
            self._actors.pop(key_id, None)
            return None
        actor = Actor(
            organization_id=row.organization_id, user_id=row.user_id, is_admin=row.is_admin, key_id=row.key_id
        )
        if self.cache_ttl > 0:
            # Cached whether or not this caller had the right secret: the row answers the next
            # guesses for this id without a query, and the key itself.
            self._actors[key_id] = _CachedActor(row.key_hash, actor, now + self.cache_ttl)
            self._actors.move_to_end(key_id)
            while len(self._actors) > _CACHE_MAX_ENTRIES:
                self._actors.popitem(last=False)
        return actor if hmac.compare_digest(row.key_hash, digest) else None

    async def _lookup(self, key_id: str, *, known: bool) -> KeyRow | None:
        """The key's row; callers asking for one id at the same time share one query."""
        pending = self._lookups.get(key_id)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_bounded(key_id, known=known))
            self._lookups[key_id] = pending
            pending.add_done_callback(lambda done: self._lookup_done(key_id, done))
        # A caller that gives up (cancelled) does not cancel the query the others wait for.
        return await asyncio.shield(pending)

    def _lookup_done(self, key_id: str, done: asyncio.Future[KeyRow | None]) -> None:
        if self._lookups.get(key_id) is done:
            del self._lookups[key_id]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already (or none is left)

    async def _fetch_bounded(self, key_id: str, *, known: bool) -> KeyRow | None:
        if known:  # a key this process has seen: never queued behind unknown ones
            return await self._fetch_key(key_id=key_id)
        if self._unknown_lookups is None:
            self._unknown_lookups = asyncio.Semaphore(UNKNOWN_LOOKUPS)
        async with self._unknown_lookups:
            return await self._fetch_key(key_id=key_id)

    def _remember_unknown(self, key_id: str, now: float) -> None:
        self._unknown[key_id] = now + NEGATIVE_TTL
        self._unknown.move_to_end(key_id)
        while len(self._unknown) > _CACHE_MAX_ENTRIES:
            self._unknown.popitem(last=False)

    # --- BYOK providers ---------------------------------------------------------------------

    async def create_provider(
        self,
        *,
        organization_id: str,
        name: str,
        endpoint_type: str,
        base_url: str,
        api_key_encrypted: str,
        api_key_last4: str,
    ) -> ProviderRecord:
        """Store a provider (its key already encrypted). Raises `ProviderAlreadyExists`."""
        if not name:
            raise InvalidRequest("a provider needs a name", metadata={"field": "name"})
        record = ProviderRecord(
            id=f"provider-{uuid.uuid4()}",
            organization_id=organization_id,
            name=name,
            endpoint_type=endpoint_type,
            base_url=base_url,
            api_key_encrypted=api_key_encrypted,
            api_key_last4=api_key_last4,
            created_at=utcnow(),
        )
        await self._insert_provider(record=record)
        self._providers_changed()
        return record

    async def list_providers(
        self, *, organization_id: str, include_global: bool = False
    ) -> list[ProviderRecord]:
        """The organization's own providers (uncached), plus the global ones when asked."""
        orgs = [organization_id]
        if include_global and organization_id != GLOBAL_ORGANIZATION:
            orgs.append(GLOBAL_ORGANIZATION)
        return await self._select_providers(organization_ids=orgs)

    async def get_provider(self, *, organization_id: str, name: str) -> ProviderRecord | None:
        """The organization's provider of that name, else the global one, else None (cached).

        A name the cached list lacks is looked up again at once: a provider another process
        (replica) just created is usable here on its first call, not 5 s later. A miss costs one
        query, as an unknown gateway key does.
        """
        cached = self._providers.get(organization_id)
        was_cached = cached is not None and cached[0] > self._clock()
        found = self._pick_provider(await self._visible_providers(organization_id), organization_id, name)
        if found is None and was_cached:
            found = self._pick_provider(
                await self._visible_providers(organization_id, fresh=True), organization_id, name
            )
        return found

    @staticmethod
    def _pick_provider(
        visible: Sequence[ProviderRecord], organization_id: str, name: str
    ) -> ProviderRecord | None:
        fallback: ProviderRecord | None = None
        for record in visible:
            if record.name != name:
                continue
            if record.organization_id == organization_id:
                return record
            fallback = record
        return fallback

    async def byok_base_urls(self, *, organization_id: str) -> tuple[str, ...]:
        """Base URLs of every provider the organization can use (its own and global; cached)."""
        return tuple(dict.fromkeys(r.base_url for r in await self._visible_providers(organization_id)))

    async def delete_provider(self, *, organization_id: str, name: str) -> bool:
        """Delete the organization's own provider (never a global one from another organization)."""
        deleted = await self._delete_provider(organization_id=organization_id, name=name)
        self._providers_changed()
        return deleted

    async def all_providers(self) -> list[ProviderRecord]:
        """Every provider of every organization, global ones included (uncached; for rotation)."""
        return await self._select_all_providers()

    async def replace_provider_key(self, *, provider_id: str, old: str, new: str) -> bool:
        """Swap a provider's encrypted key if it is still `old`; False when it changed or is gone."""
        replaced = await self._replace_provider_key(provider_id=provider_id, old=old, new=new)
        self._providers_changed()
        return replaced

    def _providers_changed(self) -> None:
        # Called after the write: a lookup still in flight may hold the old rows, so it must not
        # cache them (see `_visible_providers`).
        self._providers_generation += 1
        self._providers.clear()

    async def _visible_providers(
        self, organization_id: str, *, fresh: bool = False
    ) -> tuple[ProviderRecord, ...]:
        now = self._clock()
        cached = self._providers.get(organization_id)
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        orgs = dict.fromkeys([organization_id, GLOBAL_ORGANIZATION])
        generation = self._providers_generation
        records = tuple(await self._select_providers(organization_ids=list(orgs)))
        if self.cache_ttl > 0 and generation == self._providers_generation:
            self._providers[organization_id] = (now + self.cache_ttl, records)
            self._providers.move_to_end(organization_id)
            while len(self._providers) > _CACHE_MAX_ENTRIES:
                self._providers.popitem(last=False)
        return records
