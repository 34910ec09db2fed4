"""Egress through an HTTP proxy: `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` (off unless set).

Every proxied call is a CONNECT tunnel (for http:// targets too: the request line, headers and
keys then go to the target only, and the proxy's own credentials, sent in `Proxy-Authorization`
on the CONNECT alone, never reach an upstream). Inside the tunnel TLS is end to end, verified
against the target's host name as for a direct connection.

The SSRF guard still applies to the *target*, not to the proxy: the gateway resolves the target
itself with `SafeResolver`, under the same rule as a direct call (link-local and metadata
addresses always refused, private ones unless the operator listed the target), and then
- for a tenant's target (not operator-listed) it asks the proxy for the address it vetted
  (`CONNECT 203.0.113.7:443`), so a name that resolves differently a moment later (DNS
  rebinding) cannot steer the proxy to an address the gateway would have refused;
- for an operator-listed target it asks for the name (`CONNECT api.openai.com:443`), so a
  corporate proxy's rules by host name apply.
The proxy itself is operator configuration and may be on a private address.

The lowercase variables win over the uppercase ones, as in curl and Python's urllib. `NO_PROXY`:
comma-separated host names (`example.com` also matches its subdomains, a leading `.` too), IP
addresses, CIDR ranges (`10.0.0.0/8`, compared with an IP-literal target), each optionally with
`:port`; `*` turns the proxy off. Only `http://` proxies are supported (`host:port` alone means
http); anything else refuses to start, naming the variable.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from server.auth.redact import redact_url

# The most a proxy's answer to CONNECT may be (status line and headers).
MAX_CONNECT_HEAD = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})([^\r\n]*)\r\n")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str = field(default="", repr=False)  # the Proxy-Authorization value, if any
    display: str = ""  # the URL without its password, for logs

    def __repr__(self) -> str:
        return f"Proxy({self.display!r})"


def _shown(raw: str) -> str:
    """A proxy setting fit for an error message: everything before the last `@` hidden. A
    garbled URL (an unencoded `/`, `#`, `?` or `[` in the password) does not parse, so a
    redaction that trusts the parse would show the password or a piece of it."""
    text = raw.strip()
    scheme, sep, rest = text.partition("://") if "://" in text else ("", "", text)
    if "@" not in rest:
        return redact_url(raw)
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def _parse_proxy(variable: str, raw: str) -> Proxy:
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{variable}: not a proxy URL ({_shown(raw)})") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"{variable}: only http://host:port proxies are supported ({_shown(raw)})")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{variable}: a proxy URL has no path ({_shown(raw)})")
    authorization = ""
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return Proxy(parts.hostname, port or 80, authorization, redact_url(text))


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Bypass:
    """NO_PROXY: entries with the port they apply to (None: every port)."""

    names: tuple[tuple[str, int | None], ...] = ()  # lower-case, without a leading dot
    networks: tuple[tuple[_Network, int | None], ...] = ()
    everything: bool = False

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        name = host.lower().rstrip(".")
        for entry, entry_port in self.names:
            if entry_port in (None, port) and (name == entry or name.endswith("." + entry)):
                return True
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return any(entry_port in (None, port) and address in network for network, entry_port in self.networks)


def _parse_no_proxy(raw: str) -> _Bypass:
    names: list[tuple[str, int | None]] = []
    networks: list[tuple[_Network, int | None]] = []
    for item in (part.strip().lower() for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            return _Bypass(everything=True)
        entry, port = item, None
        bracketed = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?", entry)
        if bracketed:
            entry, port = bracketed.group(1), int(bracketed.group(2)) if bracketed.group(2) else None
        elif entry.count(":") == 1:
            entry, _, port_text = entry.partition(":")
            if not (port_text.isascii() and port_text.isdigit()):  # int() refuses "²"
                raise ValueError(f"NO_PROXY: {item!r} is not host[:port]")
            port = int(port_text)
        try:
            networks.append((ipaddress.ip_network(entry, strict=False), port))
        except ValueError:
            names.append((entry.removeprefix("*").lstrip("."), port))
    return _Bypass(tuple(names), tuple(networks))


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Which proxy, if any, a target goes through."""

    https: Proxy | None = None
    http: Proxy | None = None
    bypass: _Bypass = field(default_factory=_Bypass)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyConfig | None:
        """None when no proxy variable is set; ValueError naming the variable when one is garbled."""
        https = _first(environ, "https_proxy", "HTTPS_PROXY")
        http = _first(environ, "http_proxy", "HTTP_PROXY")
        if https is None and http is None:
            return None
        no_proxy = _first(environ, "no_proxy", "NO_PROXY")
        return cls(
            https=_parse_proxy(*https) if https else None,
            http=_parse_proxy(*http) if http else None,
            bypass=_parse_no_proxy(no_proxy[1]) if no_proxy else _Bypass(),
        )

    def for_target(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypass.matches(host, port):
            return None
        return proxy

    def describe(self) -> str:
        parts = []
        if self.https is not None:
            parts.append(f"https via {self.https.display}")
        if self.http is not None:
            parts.append(f"http via {self.http.display}")
        return ", ".join(parts)


class ProxyRefused(OSError):
    """The proxy answered CONNECT with something other than a tunnel (message safe to show)."""


class _ConnectHead(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, and nothing after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.extra = 0  # bytes received after the head
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            # After a 200 the tunnel is the target's, which does not speak first; after a refusal
            # these are the proxy's error page, ignored.
            self.extra = len(self._buffer) - end - 4
            self.head.set_result(bytes(self._buffer[: end + 4]))
        elif len(self._buffer) > MAX_CONNECT_HEAD:
            self.head.set_exception(ProxyRefused("the egress proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ProxyRefused("the egress proxy closed the connection during CONNECT"))


def connect_request(proxy: Proxy, authority: str) -> bytes:
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, authority: str
) -> tuple[asyncio.Transport, _ConnectHead]:
    """A TCP connection to `proxy` tunnelled to `authority` (`host:port`); OSError on failure,
    ProxyRefused when the proxy answered but gave no tunnel.

    Messages never name the proxy (callers' errors reach tenants: the proxy's address is the
    operator's business, and its credentials nobody's); the start-up log says which it is.
    """
    transport, protocol = await loop.create_connection(lambda: _ConnectHead(loop), proxy.host, proxy.port)
    try:
        transport.write(connect_request(proxy, authority))
        head = await protocol.head
        match = _STATUS_LINE.match(head)
        if match is None:
            raise ProxyRefused("the egress proxy did not answer CONNECT with HTTP")
        status = int(match.group(1))
        if status != 200:
            reason = _PRINTABLE.sub("", match.group(2).decode("latin-1")).strip()[:80]
            raise ProxyRefused(f"the egress proxy refused the tunnel to {authority}: {status} {reason}")
        if protocol.extra:
            raise ProxyRefused("the egress proxy sent bytes after its answer to CONNECT")
    except BaseException:
        transport.close()
        raise
    return transport, protocol
