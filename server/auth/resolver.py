"""Connection-time enforcement of the address rules, per call.

`EndpointPolicy.check` sees only the URL; a host name can resolve to 169.254.169.254 or to the
operator's internal network (`localtest.me`, `*.nip.io`, a Kubernetes service name), or be rebound
to one between check and connect. `SafeResolver` is the only way the HTTP client
(`server.providers.http`) turns a host into addresses, and it keeps only the addresses the call
may use:
  * never link-local or cloud metadata (`is_forbidden_address`), for any call;
  * only public ones (`is_public_address`) unless the call's target was listed by the operator
    (`private_ok`, from `EndpointPolicy.operator_listed`): a tenant's BYOK endpoint never reaches
    loopback or a private network, whatever its name resolves to.
It raises `ForbiddenAddressError` when nothing is left. Literal IP hosts go through the same
check (no lookup), so the rule holds even for a URL that skipped `EndpointPolicy.check`. Map the
error to `EndpointNotAllowed`, never to UPSTREAM_UNAVAILABLE: it is not retried.

Lookups are cached for `ttl` seconds (new connections are rare with keep-alive, but a burst of
them must not queue on the resolver thread pool). The cache holds the lookup's raw answer and
every use filters it again under that call's rule, so an answer cached for an operator-listed
call is never handed unchecked to a tenant's call; failures are never cached. Concurrent
lookups of one name share one (tenants' apart from the operator's), and lookups for tenants'
targets run `TENANT_LOOKUPS` at a time.
The HTTP client also checks a kept-alive connection's address class before reusing it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

from server.auth.endpoints import FORBIDDEN_HOSTNAMES, is_forbidden_address, is_public_address

Address = tuple[socket.AddressFamily, str]
Lookup = Callable[[str, int], Awaitable[list[Address]]]

# Lookups in flight at once for targets the operator did not list. A tenant controls its BYOK
# host's DNS and can make every lookup take the resolver's full timeout; without a bound, slow
# names would hold every thread of the loop's executor (where getaddrinfo runs) and stall the
# lookups of the operator's own endpoints, which have no such bound.
TENANT_LOOKUPS = 4


def address_allowed(address: str, *, private_ok: bool) -> bool:
    """May a call connect to `address`? (`private_ok`: the target is operator-listed.)"""
    if is_forbidden_address(address):
        return False
    return private_ok or is_public_address(address)


class ForbiddenAddressError(OSError):
    """No address of a host may be used by this call (or the name itself is forbidden)."""

    def __init__(self, host: str, *, private_ok: bool = True) -> None:
        rule = (
            "link-local or cloud-metadata addresses"
            if private_ok
            else "loopback, private, link-local or other non-public addresses, which only endpoints "
            "the operator listed may reach"
        )
        super().__init__(f"{host[:100]} resolves only to {rule}; refused")
        self.host = host
        self.private_ok = private_ok


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
    """Host -> addresses this call may connect to; never a forbidden one."""

    def __init__(self, lookup: Lookup | None = None, *, ttl: float = 60.0) -> None:
        self._lookup = lookup if lookup is not None else system_lookup
        self._ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}
        # One lookup per name at a time: a burst of new connections to one host shares it. Kept
        # apart for tenant and operator lookups: a tenant may name the operator's own host (on a
        # path the operator did not list), and an operator call must never join a lookup that
        # waits for a tenant slot.
        self._pending: dict[tuple[str, int, bool], asyncio.Future[list[Address]]] = {}
        self._tenant_slots = asyncio.Semaphore(TENANT_LOOKUPS)

    async def resolve(self, host: str, port: int, *, private_ok: bool = False) -> list[Address]:
        """The usable addresses of `host`; `private_ok` only for operator-listed targets."""
        name = host.lower().rstrip(".")
        if name in FORBIDDEN_HOSTNAMES:
            raise ForbiddenAddressError(host)
        literal = _ip_literal(host)
        if literal is not None:
            if not address_allowed(str(literal), private_ok=private_ok):
                raise ForbiddenAddressError(host, private_ok=private_ok)
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, str(literal))]
        key = (name, port)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            found = cached[1]
        else:
            found = await self._shared_lookup(host, port, key, tenant=not private_ok)
        # Filtered on every use, cached or not: the rule belongs to the call, not to the name.
        allowed = [a for a in found if address_allowed(a[1], private_ok=private_ok)]
        if not allowed:
            raise ForbiddenAddressError(host, private_ok=private_ok)
        return allowed

    async def _shared_lookup(
        self, host: str, port: int, key: tuple[str, int], *, tenant: bool
    ) -> list[Address]:
        shared = (*key, tenant)
        pending = self._pending.get(shared)
        if pending is None:
            pending = asyncio.ensure_future(self._run_lookup(host, port, key, tenant=tenant))
            self._pending[shared] = pending
            pending.add_done_callback(lambda done: self._lookup_done(shared, done))
        # Shielded: a caller that gives up (its deadline) does not cancel the others' lookup.
        return await asyncio.shield(pending)

    async def _run_lookup(self, host: str, port: int, key: tuple[str, int], *, tenant: bool) -> list[Address]:
        if tenant:
            async with self._tenant_slots:
                found = await self._lookup(host, port)
        else:
            found = await self._lookup(host, port)
        if len(self._cache) > 1024:  # many distinct BYOK hosts: start over rather than grow
            self._cache.clear()
        self._cache[key] = (time.monotonic() + self._ttl, found)
        return found

    def _lookup_done(self, key: tuple[str, int, bool], done: asyncio.Future[list[Address]]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: a lookup every caller gave up on is not an error to log


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
