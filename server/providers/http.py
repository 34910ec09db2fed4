"""The HTTP client shared by every provider: keep-alive HTTP/1.1 connections per origin, TLS.

Why not aiohttp (which this gateway used first): on this machine aiohttp's client costs about
200-300 us of CPU per request (URL objects, cookie jar, header multidicts, tracing hooks, a task
per timeout), more than everything else the gateway does for a request. Providers need little:
POST a body, read the answer whole or as it streams, keep connections warm, stop at a deadline,
never follow a redirect. `HttpClient` does exactly that on asyncio protocols with the llhttp
parser (httptools) and costs a few tens of microseconds. Providers see only this module, so the
choice can change in one place.

Security: every address connected to comes from `SafeResolver`, which refuses link-local and
cloud-metadata addresses at connect time (a name rebound to 169.254.169.254 gets nowhere), and
every non-public address unless the call says its target is operator-listed (`post(...,
private_ok=True)`); a kept-alive connection is reused only if its address passes the same rule
for the new call (one origin can serve an operator-listed and a tenant's target); TLS
verifies certificates and host names with the system trust store (`SSL_CERT_FILE` and
`SSL_CERT_DIR` are honoured, as OpenSSL does); header values with line breaks are refused, and
their values never appear in an error. With `proxies` (HTTPS_PROXY / HTTP_PROXY / NO_PROXY, see
`server.providers.proxy`), a target is reached through a CONNECT tunnel, after the same
resolver check of the target.

Timeouts (`Timeout`): `total` bounds the whole exchange, body included (the caller's deadline);
`idle` bounds connecting and every wait for the next bytes (a stream with no deadline may run
long, a silent upstream may not), and without a `total` also the time from sending to the
complete response head (status line, headers, 1xx answers), which bytes trickling in do not
extend. The head's size is capped too (`http_connection.MAX_HEAD_BYTES` and its neighbours).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from types import MappingProxyType
from urllib.parse import quote, urlsplit

from server.auth.endpoints import MAX_CACHED_URL_CHARS, is_public_address
from server.auth.resolver import ForbiddenAddressError, SafeResolver
from server.providers.http_connection import (
    BodyTooLargeError,
    Connection,
    DeadlineTimer,
    HttpClientError,
    IdleTimeoutError,
    InvalidResponseError,
    Response,
    ServerDisconnectedError,
)
from server.providers.proxy import Proxy, ProxyConfig, ProxyRefused, open_tunnel
from server.running_loop import RunningLoop

log = logging.getLogger("llmgateway.http")

__all__ = [
    "BodyTooLargeError",
    "ConnectError",
    "FixedHeaders",
    "HttpClient",
    "HttpClientError",
    "IdleTimeoutError",
    "InvalidHeaderError",
    "InvalidResponseError",
    "InvalidURLError",
    "Response",
    "ServerDisconnectedError",
    "Timeout",
]

USER_AGENT = "llm-gateway/0.1"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are in a request target; everything else is percent-encoded, so no
# URL can smuggle a space or a line break into the request line.
_TARGET_SAFE = "/?#[]@!$&'()*+,;=:-._~%"


class InvalidURLError(HttpClientError):
    """The URL cannot be requested (not http/https, no host, a bad port)."""


class InvalidHeaderError(HttpClientError):
    """A header name or value an HTTP/1.1 request cannot carry (line breaks, control characters)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} header has characters an HTTP header cannot carry")
        self.header = name


class ConnectError(HttpClientError):
    """No connection could be made (refused, unreachable, DNS failure, TLS failure)."""


@dataclass(frozen=True, slots=True)
class Timeout:
    total: float | None = None  # seconds for the whole exchange, from the call
    # seconds for connecting and for each wait for more bytes; without `total`, also for the head
    idle: float | None = None


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[str, str, int]  # scheme, host, port: connections are pooled per origin
    host: str  # as connected to and verified by TLS (no brackets)
    request_line: bytes  # "POST /path HTTP/1.1\r\nHost: ...\r\n"


def _parse_target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURLError(f"not a usable URL ({exc})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in _DEFAULT_PORTS or not host:
        raise InvalidURLError("not a usable URL: it needs http:// or https:// and a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidURLError("not a usable URL: credentials in a URL are never sent")
    if not host.isascii() or any(ord(c) <= 32 or ord(c) == 127 for c in host):
        raise InvalidURLError("not a usable URL: the host must be ASCII without control characters")
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    path = quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        path = f"{path}?{quote(parts.query, safe=_TARGET_SAFE)}"
    host_header = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        host_header = f"{host_header}:{port}"
    line = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")
    return _Target((scheme, host, port), host, line)


_parse_target_cached = lru_cache(maxsize=1024)(_parse_target)


def parse_target(url: str) -> _Target:
    """Where `url` connects to; cached for the URLs sent every call, and a huge one (a caller's
    endpoint can be megabytes) parsed anew, never kept."""
    return _parse_target_cached(url) if len(url) <= MAX_CACHED_URL_CHARS else _parse_target(url)


# RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than tab end or split a header line (CR, LF) or confuse parsers.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The client frames the message itself; a caller's copy would contradict it (request smuggling).
_FRAMING_HEADERS = frozenset({"content-length", "host", "transfer-encoding", "connection"})


def _header_block(
    defaults: Mapping[str, tuple[str, str]], headers: Mapping[str, str], body_length: int
) -> bytes:
    """The header lines after the request line: the defaults, overridden case-insensitively."""
    return f"Content-Length: {body_length}\r\n{_header_lines(defaults, headers)}\r\n".encode()


def _header_lines(defaults: Mapping[str, tuple[str, str]], headers: Mapping[str, str]) -> str:
    """The lines of `defaults` overridden case-insensitively by `headers` (a default's line stays
    where it was, with the caller's name and value); InvalidHeaderError for an unusable one."""
    merged = dict(defaults)
    usable = _USABLE_NAMES
    for name, value in headers.items():
        lower = usable.get(name) or _checked_name(name)
        # Printable ASCII has none of _BAD_VALUE's characters, and is cheaper to tell than a
        # search; a tab or a non-ASCII character is searched for the refused ones.
        if not (value.isascii() and value.isprintable()) and _BAD_VALUE.search(value):
            raise InvalidHeaderError(name)
        merged[lower] = (name, value)
    return "".join([f"{name}: {value}\r\n" for name, value in merged.values()])


class FixedHeaders:
    """Request headers that are the same on every call made with them and never carry a secret
    (a content type, what is accepted): checked once here, and their lines (after the client's
    defaults) built once per client. The call's own headers (keys among them) are still checked
    and formatted per call, and never kept. Never changed once made."""

    __slots__ = ("headers",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        _header_lines({}, headers)  # an unusable one is refused when made, not per call
        # A read-only copy: the argument may change later, and a client's cached lines of these
        # must stay what `{**fixed.headers, **own}` (the general path) sends.
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers))


# FixedHeaders a client keeps the lines of: module constants in practice, bounded regardless.
_MAX_FIXED_BLOCKS = 64


# Header names found usable, name -> its lower case: the same few names come with every call.
# Names only (never a value: values carry the keys), of at most 64 characters, 256 of them.
_USABLE_NAMES: dict[str, str] = {}
_MAX_CACHED_NAME_CHARS = 64
_MAX_CACHED_NAMES = 256


def _checked_name(name: str) -> str:
    """The lower case of a usable header name; InvalidHeaderError for any other."""
    lower = name.lower()
    if lower in _FRAMING_HEADERS or not _HEADER_NAME.fullmatch(name):
        raise InvalidHeaderError(name.encode("ascii", "replace").decode()[:40] or "(empty)")
    if len(name) <= _MAX_CACHED_NAME_CHARS:
        if len(_USABLE_NAMES) >= _MAX_CACHED_NAMES:
            _USABLE_NAMES.clear()
        _USABLE_NAMES[name] = lower
    return lower


class HttpClient:
    """Keep-alive connections per origin; created without a loop, used inside the running one."""

    def __init__(
        self,
        *,
        resolver: SafeResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_timeout: float = 30.0,
        default_headers: Mapping[str, str] | None = None,
        proxies: ProxyConfig | None = None,
    ) -> None:
        self._resolver = resolver if resolver is not None else SafeResolver()
        self._proxies = proxies
        self._ssl_context = ssl_context
        self._keepalive_timeout = keepalive_timeout
        defaults = (
            default_headers
            if default_headers is not None
            # Identity: answers are small JSON, and a compressed body could expand without bound.
            else {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        )
        _header_block({}, defaults, 0)  # checked once here, as a caller's headers are per request
        self._default_headers = {name.lower(): (name, value) for name, value in defaults.items()}
        # FixedHeaders -> (the defaults' and its lines, UTF-8; the lower-case names they hold).
        self._fixed_blocks: dict[FixedHeaders, tuple[bytes, frozenset[str]]] = {}
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._in_use: set[Connection] = set()
        self._all: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines: DeadlineTimer | None = None  # of the loop the client was last used in
        self._closed = False
        # asyncio.get_running_loop() makes a getpid() system call on Python 3.11 (its fork
        # check), twice per request here otherwise.
        self._loop = RunningLoop()

    @property
    def connections_in_use(self) -> int:
        """Connections carrying an exchange right now (for tests and diagnostics)."""
        return len(self._in_use)

    @property
    def connections_idle(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def pool_sizes(self) -> dict[tuple[str, str], int]:
        """Open connections by (origin, "idle" | "in_use"), for the metrics sampler."""
        sizes: dict[tuple[str, str], int] = {}
        for connection in self._in_use:
            key = (_origin(connection.key), "in_use")
            sizes[key] = sizes.get(key, 0) + 1
        for origin, idle in self._idle.items():
            if idle:
                sizes[(_origin(origin), "idle")] = len(idle)
        return sizes

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: Timeout,
        *,
        private_ok: bool = False,
        fixed: FixedHeaders | None = None,
    ) -> Response:
        """Send a POST and return once the answer's status and headers arrived.

        `private_ok`: the target is operator-listed, so it may be on loopback or a private
        network; otherwise only public addresses are connected to (or reused).

        `fixed`: headers sent before `headers`, which override them case-insensitively; the
        request is exactly the one `headers={**fixed.headers, **headers}` would send.

        The caller then reads the body (`read`, `read_chunk`) and releases or closes the response.
        A failure is never retried here, not even on a kept-alive connection the upstream had
        just dropped: a POST may have been acted on, so whether to send it again is the retry
        policy's decision (`server.core.retry`), not the transport's.
        """
        if self._closed:
            raise HttpClientError("the HTTP client is closed")
        target = parse_target(url)
        if fixed is None:
            block = _header_block(self._default_headers, headers, len(body))
        else:
            block = self._block_after_fixed(fixed, headers, len(body))
        payload = b"".join((target.request_line, block, body))
        loop = self._loop.get()
        now = loop.time()  # no await before the connection is chosen: one reading serves both
        deadline = None if timeout.total is None else now + timeout.total
        connection = self._idle_connection(target.key, now, private_ok=private_ok)
        if connection is None:
            connection = await self._connect(target, loop, deadline, timeout.idle, private_ok=private_ok)
        self._in_use.add(connection)
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:  # the old one stays with its loop
            deadlines = self._deadlines = DeadlineTimer(loop)
        response = Response(
            connection, loop, deadline=deadline, idle_timeout=timeout.idle, deadlines=deadlines
        )
        connection.start(response, payload)
        try:
            await response.wait_head()
        except BaseException:
            response.close()
            raise
        return response

    def _block_after_fixed(self, fixed: FixedHeaders, headers: Mapping[str, str], body_length: int) -> bytes:
        """`_header_block` of `{**fixed.headers, **headers}`, without building it again per call.

        When no name of `headers` is one of the defaults or of `fixed` (nor twice in `headers`),
        merging appends their lines, in order, after the defaults' and fixed lines: so those are
        cached, and only `headers` is checked and formatted. Anything else (a name not yet known
        usable, an override, a value to refuse) takes the general path, which decides as always.
        """
        cached = self._fixed_blocks.get(fixed)
        if cached is None:
            if len(self._fixed_blocks) >= _MAX_FIXED_BLOCKS:
                self._fixed_blocks.clear()
            lines = _header_lines(self._default_headers, fixed.headers)
            taken = frozenset(self._default_headers) | {name.lower() for name in fixed.headers}
            cached = self._fixed_blocks[fixed] = (lines.encode(), taken)
        fixed_lines, taken = cached
        usable = _USABLE_NAMES
        block = b"Content-Length: %d\r\n%b" % (body_length, fixed_lines)
        seen: list[str] = []
        for name, value in headers.items():
            lower = usable.get(name)
            # As in `_header_lines`: a tab, a non-ASCII or a refused character goes to its check.
            printable = value.isascii() and value.isprintable()
            if lower is None or lower in taken or lower in seen or not printable:
                return _header_block(self._default_headers, {**fixed.headers, **headers}, body_length)
            seen.append(lower)
            block += f"{name}: {value}\r\n".encode()
        return block + b"\r\n"

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._all):
            connection.close()
        if self._deadlines is not None:
            self._deadlines.close()
        self._idle.clear()
        self._in_use.clear()
        self._all.clear()

    # -- the pool (ConnectionPool protocol of http_connection) --------------------------------------

    def check_in(self, connection: Connection, *, reusable: bool) -> None:
        self._in_use.discard(connection)
        if not reusable or self._closed or not connection.usable:
            connection.close()
            return
        loop = self._loop.get()
        connection.idle_since = loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive_timeout, self._sweep)

    def forget(self, connection: Connection) -> None:
        self._all.discard(connection)
        self._in_use.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _idle_connection(
        self, key: tuple[str, str, int], now: float, *, private_ok: bool
    ) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        for index in range(len(idle) - 1, -1, -1):  # the most recently used first: the warmest
            connection = idle[index]
            if not self._fresh(connection, now):
                del idle[index]
                connection.close()
            elif private_ok or connection.public:  # the resolver's rule, decided once at connect
                del idle[index]
                return connection
            # else: opened for an operator-listed call to a private address; stays for those
        return None

    def _fresh(self, connection: Connection, now: float) -> bool:
        """Open, and idle for less than the keep-alive timeout (upstreams drop older ones)."""
        return connection.usable and now - connection.idle_since < self._keepalive_timeout

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive timeout (upstreams drop them anyway)."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if self._fresh(c, now)]
            for connection in idle:
                if connection not in keep:
                    connection.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive_timeout / 2, self._sweep)

    async def _connect(
        self,
        target: _Target,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None,
        idle_timeout: float | None,
        *,
        private_ok: bool,
    ) -> Connection:
        scheme, host, port = target.key
        limit = _earliest(deadline, None if idle_timeout is None else loop.time() + idle_timeout)
        try:
            async with asyncio.timeout_at(limit):
                return await self._open(target, loop, private_ok=private_ok)
        except TimeoutError:
            if deadline is not None and limit == deadline:
                raise TimeoutError(f"connecting to {host}:{port} did not finish in time") from None
            raise IdleTimeoutError(f"connecting to {host}:{port} took over {idle_timeout:g} s") from None

    async def _open(
        self, target: _Target, loop: asyncio.AbstractEventLoop, *, private_ok: bool
    ) -> Connection:
        scheme, host, port = target.key
        try:
            addresses = await self._resolver.resolve(host, port, private_ok=private_ok)
        except OSError as exc:
            if isinstance(exc, (HttpClientError, ForbiddenAddressError)):
                raise
            raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        context = self._tls_context() if scheme == "https" else None
        proxy = self._proxies.for_target(scheme, host, port) if self._proxies is not None else None
        if proxy is not None:
            return await self._open_tunnel(
                proxy, target, addresses[0][1], context, loop, private_ok=private_ok
            )

        async def connect(family: socket.AddressFamily, address: str) -> Connection:
            public = is_public_address(address)
            _transport, connection = await loop.create_connection(
                lambda: Connection(self, target.key, public=public),
                address,
                port,
                family=family,
                ssl=context,
                server_hostname=host if context is not None else None,
            )
            return connection

        try:
            if len(addresses) == 1:
                connection = await connect(*addresses[0])
            else:
                connection = await _happy_eyeballs([partial(connect, f, a) for f, a in addresses])
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        self._all.add(connection)
        return connection

    async def _open_tunnel(
        self,
        proxy: Proxy,
        target: _Target,
        address: str,
        context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
        *,
        private_ok: bool,
    ) -> Connection:
        """`target` through a CONNECT tunnel: to the address the resolver vetted for a tenant's
        target (no second lookup by the proxy), by name for an operator-listed one."""
        scheme, host, port = target.key
        destination = host if private_ok else address
        authority = f"[{destination}]:{port}" if ":" in destination else f"{destination}:{port}"
        try:
            transport, _ = await open_tunnel(loop, proxy, authority)
        except OSError as exc:
            # The proxy's own address stays out of the message (it reaches tenants).
            reason = str(exc) if isinstance(exc, ProxyRefused) else exc.strerror or type(exc).__name__
            raise ConnectError(
                f"cannot connect to {host}:{port} through the egress proxy: {reason}"
            ) from None
        connection = Connection(self, target.key, public=is_public_address(address))
        try:
            if context is not None:
                tls = await loop.start_tls(transport, connection, context, server_hostname=host)
                if tls is None:  # pragma: no cover - only for a transport closed meanwhile
                    raise ConnectError(f"cannot connect to {host}:{port}: the tunnel closed")
                connection.connection_made(tls)
            else:
                transport.set_protocol(connection)
                connection.connection_made(transport)
        except OSError as exc:
            transport.close()
            if isinstance(exc, ConnectError):
                raise
            raise ConnectError(f"cannot connect to {host}:{port} through the egress proxy: {exc}") from None
        except BaseException:
            transport.close()
            raise
        self._all.add(connection)
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's recommended connection attempt delay


async def _happy_eyeballs(attempts: Sequence[Callable[[], Awaitable[Connection]]]) -> Connection:
    """Connect to the first address that answers (RFC 8305, simplified).

    The next address is tried when the previous attempt failed or after `HAPPY_EYEBALLS_DELAY`,
    whichever comes first, so an address that silently drops packets (a broken IPv6 route, say)
    costs a quarter of a second, not the whole timeout. The first connection wins; the other
    attempts are cancelled, and any that connected anyway are closed.
    """
    started: list[asyncio.Task[Connection]] = []
    running: set[asyncio.Task[Connection]] = set()
    errors: list[BaseException] = []
    winner: asyncio.Task[Connection] | None = None
    try:
        for index, attempt in enumerate(attempts):
            task = asyncio.ensure_future(attempt())
            started.append(task)
            running.add(task)
            last = index == len(attempts) - 1
            while running and winner is None:
                done, running = await asyncio.wait(
                    running,
                    timeout=None if last else HAPPY_EYEBALLS_DELAY,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for finished in done:
                    if finished.exception() is None:
                        winner = winner or finished
                    else:
                        errors.append(finished.exception())  # type: ignore[arg-type]
                if not last:
                    break  # the delay passed or an attempt failed: start the next one now
            if winner is not None:
                return winner.result()
        raise errors[-1] if errors else OSError("no address to connect to")
    finally:
        for task in started:
            if task is winner:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().close()  # connected too late: not needed


def _origin(key: tuple[str, str, int]) -> str:
    scheme, host, port = key
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
