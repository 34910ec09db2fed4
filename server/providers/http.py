"""The HTTP client shared by every provider: one pooled aiohttp session per process.

aiohttp is the choice because it measured cheapest here (see README, design): about 340 us per
forwarded request against 1,100 us for httpx's default transport. Providers see only
`HttpClient`, so the choice can change in one place.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

log = logging.getLogger("llmgateway.http")


class GuardedResolver(AbstractResolver):
    """Resolves names, then drops addresses the policy forbids (metadata, link-local).

    Checking the addresses actually connected to (not only the name in the URL) closes the
    DNS-rebinding hole: a name that resolves to 169.254.169.254 is refused at connect time.
    """

    def __init__(self, is_forbidden: Callable[[str], bool]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._is_forbidden = is_forbidden

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not self._is_forbidden(r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses the gateway never calls")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _never_forbidden(_: str) -> bool:
    return False


class HttpClient:
    """Owns the connection pool; created inside the running event loop."""

    def __init__(self, *, is_forbidden_address: Callable[[str], bool] = _never_forbidden) -> None:
        self._is_forbidden = is_forbidden_address
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,  # the gateway's own concurrency bounds it; a pool cap would queue silently
                keepalive_timeout=30,
                resolver=GuardedResolver(self._is_forbidden),
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Timeouts are set per request from the caller's deadline.
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "llm-gateway/0.1"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a body, refusing one larger than `limit` bytes (a broken upstream must not OOM us)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"upstream body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
