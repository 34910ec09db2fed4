"""Whether calls must authenticate (`LLMGW_AUTH`), and turning call metadata into an `Actor`.

`LLMGW_AUTH`:
  * `required`: every RPC except health and reflection needs a valid gateway key.
  * `off`: nobody authenticates; every call runs as `ANONYMOUS` (warned about at start when the
    server is reachable beyond loopback).
  * `auto` (default): off while the server listens on loopback alone (with a warning at start),
    required otherwise; a non-loopback `auto` server without any key refuses to start, since no
    caller could ever get in and `off` must be chosen explicitly.

While auth is off a presented key is ignored (the call is `ANONYMOUS` either way), so behaviour
never depends on whether some client happens to send a header.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from server.auth.actor import ANONYMOUS, ANONYMOUS_ORGANIZATION, Actor
from server.errors import PermissionDenied, Unauthenticated
from server.setting_names import AUTH_MODES  # re-exported: defined once

if TYPE_CHECKING:
    from server.auth.store import AuthStore

log = logging.getLogger(__name__)


class AuthConfigError(ValueError):
    """The authentication settings cannot work; the message says what to change."""


def _listen_hosts(listen: str) -> list[str | None]:
    """Host part of each comma-separated listen address; None for unix sockets (local by nature)."""
    hosts: list[str | None] = []
    for raw in listen.split(","):
        address = raw.strip()
        if not address:
            continue
        if address.startswith(("unix:", "unix-abstract:")):
            hosts.append(None)
            continue
        if address.startswith("["):
            hosts.append(address[1 : address.find("]")] if "]" in address else address)
            continue
        try:
            ipaddress.ip_address(address)  # a bare address without port, IPv6 included
            hosts.append(address)
            continue
        except ValueError:
            pass
        host, sep, _port = address.rpartition(":")
        hosts.append(host if sep else address)
    return hosts


def _is_loopback_host(host: str) -> bool:
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False  # "", "*", or a host name: may be reachable from anywhere
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def is_loopback_only(listen: str) -> bool:
    """True when every listen address is loopback (127.0.0.0/8, ::1, localhost) or a unix socket."""
    hosts = _listen_hosts(listen)
    return bool(hosts) and all(host is None or _is_loopback_host(host) for host in hosts)


def auth_mode_effective(mode: str, *, listen: str, has_keys: bool) -> bool:
    """True when calls must authenticate; raises `AuthConfigError` for a configuration that cannot work."""
    mode = mode.strip().lower()
    if mode not in AUTH_MODES:
        raise AuthConfigError(f"LLMGW_AUTH must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    loopback = is_loopback_only(listen)
    if mode == "required":
        if not has_keys:
            log.warning(
                "LLMGW_AUTH=required but no gateway key exists: every call will be UNAUTHENTICATED "
                "until one is made with `llm-gateway keys create --org ORG`"
            )
        return True
    if mode == "off":
        if not loopback:
            log.warning(
                "LLMGW_AUTH=off while listening on %s: anyone who can reach this address can use the "
                "gateway and its provider keys, as organization %r with admin rights",
                listen,
                ANONYMOUS_ORGANIZATION,
            )
        return False
    if loopback:
        log.warning(
            "LLMGW_AUTH=auto: authentication is OFF because the server listens on loopback only (%s); "
            "every call runs as organization %r with admin rights. Set LLMGW_AUTH=required to enforce keys",
            listen,
            ANONYMOUS_ORGANIZATION,
        )
        return False
    if not has_keys:
        raise AuthConfigError(
            f"LLMGW_AUTH=auto and the server listens on {listen}, beyond loopback, but no gateway key "
            "exists: create one with `llm-gateway keys create --org ORG --admin`, or set LLMGW_AUTH=off "
            "explicitly to serve without authentication"
        )
    return True


def auth_required(mode: str, listen: str, *, has_keys: bool) -> bool:
    """Alias of `auth_mode_effective` with positional mode and listen address."""
    return auth_mode_effective(mode, listen=listen, has_keys=has_keys)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry of gRPC call metadata."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def require_admin(actor: Actor) -> None:
    """Raise `PermissionDenied` unless the actor's key is an admin key."""
    if not actor.is_admin:
        raise PermissionDenied(
            "this call needs an admin gateway key (`llm-gateway keys create --admin`)",
            metadata={"key_id": actor.key_id},
        )


class Authenticator:
    """Turns call metadata into the call's `Actor`, or raises `Unauthenticated`."""

    def __init__(self, store: AuthStore | None, *, enabled: bool) -> None:
        if enabled and store is None:
            raise ValueError("an enabled Authenticator needs a store")
        self.store = store
        self.enabled = enabled

    async def actor(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Actor:
        """The actor of a call; `ANONYMOUS` while auth is off."""
        if not self.enabled or self.store is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing gateway key: send `authorization: Bearer <key>` metadata")
        actor = await self.store.authenticate(token=token)
        if actor is None:
            # Never echo the presented token.
            raise Unauthenticated("the gateway key is not valid or has been revoked")
        return actor
