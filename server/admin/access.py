"""Who may use the admin listener, and the console's login sessions.

* Gateway auth off: everyone who reaches the listener is `ANONYMOUS` (as on the gRPC port).
* Gateway auth on: the console and its API need a gateway key, as a Bearer header or a session
  made by the login form (an opaque id in an HttpOnly, SameSite=Strict cookie; the key stays in
  this process's memory and is re-checked on every request, so a revoked key's session ends).
  On a loopback listener any valid key works and is scoped as ProviderTraceService scopes it; on
  any other address only an admin key does. `/metrics` is open on loopback and needs an admin key
  elsewhere.

State changes (login, logout) are POSTs that must come from the console's own origin (Origin
header); with SameSite=Strict no other site's page can ride the cookie. On a loopback listener
the Host header must be a loopback name, so a DNS-rebinding page cannot read the console.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from server.auth.actor import ANONYMOUS, Actor
from server.auth.policy import Authenticator, _is_loopback_host

COOKIE = "llmgw_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1024


@dataclass(slots=True)
class _Session:
    token: str
    expires: float


class Sessions:
    """Login sessions of this process: id -> the key it was opened with, bounded, expiring."""

    def __init__(self, *, ttl: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._ttl = ttl
        self._limit = limit
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def open(self, token: str) -> str:
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = _Session(token, time.monotonic() + self._ttl)
        while len(self._sessions) > self._limit:
            self._sessions.popitem(last=False)  # the oldest login goes first
        return session_id

    def token(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._sessions[session_id]
            return None
        return session.token

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class Refused(Exception):
    """The request may not see this page: `status` 401 (log in) or 403 (this key may not)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Access:
    def __init__(self, authenticator: Authenticator, *, loopback: bool) -> None:
        self._authenticator = authenticator
        self.loopback = loopback
        self.sessions = Sessions()

    @property
    def required(self) -> bool:
        return self._authenticator.enabled

    async def check_key(self, token: str) -> Actor | None:
        """The actor of `token` if it may use this console, else None."""
        store = self._authenticator.store
        if store is None or not token:
            return None
        actor = await store.authenticate(token=token)
        if actor is None or (not self.loopback and not actor.is_admin):
            return None
        return actor

    async def actor(self, *, bearer: str | None, session_id: str | None) -> Actor:
        """The console user of a request, or `Refused`."""
        if not self.required:
            return ANONYMOUS
        token = bearer or (self.sessions.token(session_id) if session_id else None)
        if not token:
            raise Refused(401, "log in with a gateway key")
        store = self._authenticator.store
        actor = await store.authenticate(token=token) if store is not None else None
        if actor is None:
            if session_id and not bearer:
                self.sessions.close(session_id)
            raise Refused(401, "the gateway key is not valid or has been revoked")
        if not self.loopback and not actor.is_admin:
            raise Refused(403, "this listener is beyond loopback: it needs an admin gateway key")
        return actor

    async def metrics_allowed(self, *, bearer: str | None, session_id: str | None) -> None:
        if self.loopback or not self.required:
            return
        await self.actor(bearer=bearer, session_id=session_id)


def host_allowed(host: str, *, loopback: bool) -> bool:
    """On a loopback listener, only a loopback Host header (DNS rebinding); elsewhere any."""
    if not loopback:
        return True
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rpartition(":")[0]
    return _is_loopback_host(name)


def bearer_of(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
