"""Connection-time enforcement of the always-forbidden addresses.

`EndpointPolicy.check` sees only the URL; a host name can resolve to 169.254.169.254 (or be
rebound to it between check and connect). `SafeResolver` is the only way the HTTP client
(`server.providers.http`) turns a host into addresses: it drops every forbidden address from each
lookup, so the client can only connect to what is left, and raises `ForbiddenAddressError` when
nothing is left. Literal IP hosts go through the same check (no lookup), so the rule holds even
for a URL that skipped `EndpointPolicy.check`. Map the error to `EndpointNotAllowed`, never to
UPSTREAM_UNAVAILABLE: it is not retried.

Lookups are cached for `ttl` seconds (new connections are rare with keep-alive, but a burst of
them must not queue on the resolver thread pool); failures are never cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

from server.auth.endpoints import FORBIDDEN_HOSTNAMES, is_forbidden_address

Address = tuple[socket.AddressFamily, str]
Lookup = Callable[[str, int], Awaitable[list[Address]]]


class ForbiddenAddressError(OSError):
    """Every address of a host is link-local or cloud metadata (or the name itself is forbidden)."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves only to link-local or cloud-metadata addresses; refused")
        self.host = host


async def system_lookup(host: str, port: int) -> list[Address]:
    """The operating system's resolver (getaddrinfo on the loop's thread pool), order kept."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # the IDNA codec refuses it (a label over 63 characters, say)
        raise OSError(f"{host[:100]} is not a valid host name") from None
    seen: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        address = (socket.AddressFamily(family), str(sockaddr[0]))
        if address not in seen:
            seen.append(address)
    return seen


class SafeResolver:
    """Host -> addresses the gateway may connect to; never a forbidden one."""

    def __init__(self, lookup: Lookup | None = None, *, ttl: float = 60.0) -> None:
        self._lookup = lookup if lookup is not None else system_lookup
        self._ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        name = host.lower().rstrip(".")
        if name in FORBIDDEN_HOSTNAMES:
            raise ForbiddenAddressError(host)
        literal = _ip_literal(host)
        if literal is not None:
            if is_forbidden_address(literal):
                raise ForbiddenAddressError(host)
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, str(literal))]
        key = (name, port)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        allowed = [a for a in await self._lookup(host, port) if not is_forbidden_address(a[1])]
        if not allowed:
            raise ForbiddenAddressError(host)
        if len(self._cache) > 1024:  # many distinct BYOK hosts: start over rather than grow
            self._cache.clear()
        self._cache[key] = (now + self._ttl, allowed)
        return allowed


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
