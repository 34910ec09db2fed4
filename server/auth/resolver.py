"""Connection-time enforcement of the always-forbidden addresses, for aiohttp.

`EndpointPolicy.check` sees only the URL; a host name can resolve to 169.254.169.254 (or be
rebound to it between check and connect). `SafeResolver` wraps aiohttp's resolver and drops
every forbidden address from each lookup, so the client can only connect to what is left; when
nothing is left it raises `ForbiddenAddressError`. aiohttp wraps that in
`aiohttp.ClientConnectorDNSError`, whose `os_error` is the `ForbiddenAddressError`: map it to
`EndpointNotAllowed`, not to UPSTREAM_UNAVAILABLE.

aiohttp does not consult the resolver for literal IP hosts: those are covered by
`EndpointPolicy.check` (send the canonical URL it returns). Disable redirects
(`allow_redirects=False`) so a 3xx cannot move the request elsewhere.

    connector = aiohttp.TCPConnector(resolver=SafeResolver())
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from server.auth.endpoints import FORBIDDEN_HOSTNAMES, is_forbidden_address


class ForbiddenAddressError(OSError):
    """Every address of a host is link-local or cloud metadata (or the name itself is forbidden)."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves only to link-local or cloud-metadata addresses; refused")
        self.host = host


class SafeResolver(AbstractResolver):
    """An aiohttp resolver that never returns a forbidden address."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".") in FORBIDDEN_HOSTNAMES:
            raise ForbiddenAddressError(host)
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_forbidden_address(r["host"])]
        if not allowed:
            raise ForbiddenAddressError(host)
        return allowed

    async def close(self) -> None:
        await self._inner.close()
