"""Which upstream URLs a request may reach, and which server-held key may go where.

A request's `model_endpoint` is allowed when it lies under one of
  * the configured provider base URLs (`LLMGW_OPENAI_BASE_URL`, the OpenRouter base URL),
  * `LLMGW_ALLOWED_ENDPOINTS` entries,
  * the caller organization's BYOK base URLs (its own and the global ones),
and it is never a link-local or cloud-metadata address, whatever the lists say.

"Under" compares normalized parts, never raw strings: same scheme, same host (lower-cased, trailing
dot dropped, IP literals canonical, so `http://2852039166/`, `http://0xa9fea9fe/` and
`http://169.254.169.254/` are one address), same port (default ports made explicit) and a path
equal to the base path or continuing it after a `/` (`/v1` covers `/v1/x`, not `/v10`).

Parsing is deliberately strict, so that no URL means one thing here and another to the HTTP
client: userinfo (`https://api.openai.com@evil.com`), backslashes, whitespace and control
characters, non-ASCII hosts, IPv6 zone ids, and `.`/`..` path segments (also percent-encoded)
are refused outright. `check` returns the canonical URL; send *that* upstream.

Host names are not resolved here: a check-time lookup proves nothing (DNS rebinding: the name can
resolve differently when the HTTP client connects). Literal IPs are checked here; names are
checked at connection time by `server.auth.resolver.SafeResolver` (used by the HTTP client), which calls
`is_forbidden_address` on every address the client is about to connect to.

BYOK base URLs are registered by organization admins, i.e. tenants, not the operator; unless
`allow_private_byok` is set, a BYOK URL whose host is a literal non-public address
(`is_public_address`) or `localhost` grants nothing by itself (the operator can still list it in
`LLMGW_ALLOWED_ENDPOINTS`), so a tenant cannot point the gateway at its own internal network.
A host *name* cannot be judged here; `operator_listed` tells the HTTP client whether the call
may connect to non-public addresses at all, and `SafeResolver` enforces it on every address
(`localtest.me`, `*.nip.io`, a Kubernetes service name all end there).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urlsplit

from server.errors import EndpointNotAllowed

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),  # IPv4 link-local, includes 169.254.169.254 (AWS, GCP, Azure...)
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
)
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
FORBIDDEN_HOSTNAMES: frozenset[str] = frozenset(
    {"metadata.google.internal", "metadata.goog", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IANA special-purpose IPv4 ranges that are not globally reachable unicast (RFC 6890 and later).
_NON_PUBLIC_V4: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 connects to the host itself on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT (RFC 6598), also Alibaba's metadata 100.100.100.200
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes 255.255.255.255
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
# Inside 2000::/3 but not public: Teredo and the other IETF assignments, documentation.
_NON_PUBLIC_V6: tuple[ipaddress.IPv6Network, ...] = tuple(
    ipaddress.IPv6Network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20")
)
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_CHARS = re.compile(r"[a-z0-9.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV4_PART = re.compile(r"0x[0-9a-f]*|[0-9]+")


class InvalidEndpoint(ValueError):
    """A URL the policy cannot read safely (the text says why, without the URL's secrets)."""


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    if addr in _NAT64:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    as_int = int(addr)
    if 1 < as_int < 2**32:  # deprecated IPv4-compatible ::a.b.c.d (not :: or ::1)
        found.append(ipaddress.IPv4Address(as_int))
    return found


def is_forbidden_address(ip: str | IPAddress) -> bool:
    """True for link-local and cloud-metadata addresses, also embedded in IPv6; unparseable -> True.

    For the HTTP layer: call it on every resolved address before connecting.
    """
    if isinstance(ip, str):
        text = ip.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
        try:
            addr: IPAddress = ipaddress.ip_address(text)
        except ValueError:
            return True
    else:
        addr = ip
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        candidates.extend(_embedded_ipv4(addr))
    for candidate in candidates:
        if candidate in _METADATA_ADDRESSES:
            return True
        if any(candidate.version == net.version and candidate in net for net in _FORBIDDEN_NETWORKS):
            return True
    return False


def is_public_address(ip: str | IPAddress) -> bool:
    """True only for a globally routable unicast address (and no non-public IPv4 embedded in it).

    What a target the operator did not list may connect to: never loopback, RFC 1918, CGNAT,
    "this network" (connecting to 0.0.0.0 or :: reaches the host itself), ULA, multicast,
    documentation or reserved ranges, nor an IPv6 form that carries one of those IPv4 addresses
    (mapped, compatible, translated, NAT64, 6to4; Teredo is refused outright). IPv6 outside
    2000::/3 is not global unicast, so it is refused whatever it is; the explicit tables do not
    rely on `ipaddress.is_global`, whose answer changed between Python patch releases.
    Unparseable -> False.
    """
    if isinstance(ip, str):
        text = ip.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
        try:
            addr: IPAddress = ipaddress.ip_address(text)
        except ValueError:
            return False
    else:
        addr = ip
    if isinstance(addr, ipaddress.IPv4Address):
        return _is_public_v4(addr)
    if addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 address itself to the kernel
        return _is_public_v4(addr.ipv4_mapped)
    if addr in _NAT64:  # DNS64 networks map every public IPv4 host here: judge the IPv4 inside
        return _is_public_v4(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr not in _GLOBAL_UNICAST_V6 or any(addr in net for net in _NON_PUBLIC_V6):
        return False
    if addr.sixtofour is not None and not _is_public_v4(addr.sixtofour):
        return False
    return addr.is_global


def _is_public_v4(addr: ipaddress.IPv4Address) -> bool:
    return not any(addr in net for net in _NON_PUBLIC_V4) and addr.is_global


def _is_private_address(addr: IPAddress) -> bool:
    return not is_public_address(addr)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """WHATWG/inet_aton IPv4 forms (`2852039166`, `0xa9.0376.43518`); None when not numeric.

    Raises InvalidEndpoint for a host whose last label is numeric but which is no valid address
    (browsers and libc would not treat it as a name either).
    """
    labels = host.split(".")
    if not _IPV4_PART.fullmatch(labels[-1]):
        return None
    if len(labels) > 4 or not all(_IPV4_PART.fullmatch(label) for label in labels):
        raise InvalidEndpoint("malformed numeric host")
    numbers: list[int] = []
    for label in labels:
        if label.startswith("0x"):
            numbers.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            if not all(ch in "01234567" for ch in label):
                raise InvalidEndpoint("malformed octal host")
            numbers.append(int(label, 8))
        else:
            numbers.append(int(label))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise InvalidEndpoint("numeric host out of range")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True, slots=True)
class NormalizedURL:
    """The parts of an http(s) URL that decide where it goes."""

    scheme: str
    host: str  # lower case; canonical text for IP literals (IPv6 without brackets)
    port: int
    path: str  # as sent, without trailing slashes ("" for the root)
    query: str
    ip: IPAddress | None
    forbidden: bool

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        """scheme://host[:port]/path: safe for errors and logs (no userinfo, no query)."""
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def canonical(self) -> str:
        """The URL to send upstream: display form plus the query."""
        return self.display + (f"?{self.query}" if self.query else "")

    @property
    def is_local_or_private(self) -> bool:
        """A literal non-public address, or a `localhost` name (other names: see SafeResolver)."""
        if self.ip is not None:
            return _is_private_address(self.ip)
        return self.host == "localhost" or self.host.endswith(".localhost")

    def is_under(self, base: NormalizedURL) -> bool:
        """Same scheme, host and port, and the path is the base path or continues it after a `/`."""
        if (self.scheme, self.host, self.port) != (base.scheme, base.host, base.port):
            return False
        return self.path == base.path or self.path.startswith(base.path + "/")


def _split_netloc(netloc: str) -> tuple[str, str]:
    if "@" in netloc:
        raise InvalidEndpoint("credentials in the URL (userinfo) are not accepted")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise InvalidEndpoint("unterminated IPv6 literal")
        host, rest = netloc[1:end], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidEndpoint("malformed host")
        if "%" in host:
            raise InvalidEndpoint("IPv6 zone ids are not accepted")
        return "[" + host + "]", rest[1:] if rest else ""
    host, _, port = netloc.partition(":")
    if ":" in port:
        raise InvalidEndpoint("malformed host")
    return host, port


def _check_path(path: str) -> str:
    decoded = unquote(path)
    if _BAD_CHARS.search(decoded):
        raise InvalidEndpoint("control characters or backslashes in the path")
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise InvalidEndpoint("'.' or '..' segments in the path")
    return path.rstrip("/")


def _parse(url: str) -> NormalizedURL:
    if _BAD_CHARS.search(url):
        raise InvalidEndpoint("whitespace, control characters or backslashes in the URL")
    if not url.isascii():
        raise InvalidEndpoint("non-ASCII URL (use the punycode / percent-encoded form)")
    try:
        parts: SplitResult = urlsplit(url)
    except ValueError as exc:
        raise InvalidEndpoint("unparseable URL") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidEndpoint("only http and https URLs are accepted")
    if not parts.netloc:
        raise InvalidEndpoint("no host")
    host, port_text = _split_netloc(parts.netloc)
    port = _DEFAULT_PORTS[scheme]
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise InvalidEndpoint("invalid port")
        port = int(port_text)
    ip: IPAddress | None
    if host.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise InvalidEndpoint("invalid IPv6 literal") from exc
        host = str(ip)
    else:
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not host or not _HOST_CHARS.fullmatch(host) or "" in host.split("."):
            raise InvalidEndpoint("invalid host name")
        ip = _parse_ipv4(host)
        if ip is not None:
            host = str(ip)
    forbidden = is_forbidden_address(ip) if ip is not None else host in FORBIDDEN_HOSTNAMES
    return NormalizedURL(
        scheme=scheme,
        host=host,
        port=port,
        path=_check_path(parts.path),
        query=parts.query,
        ip=ip,
        forbidden=forbidden,
    )


# Parsed URLs are kept for the URLs a gateway sees every call, never for a huge one: 4,096 of
# them, tens of megabytes each (a caller's model_endpoint), would stay until evicted.
_parse_cached = lru_cache(maxsize=4096)(_parse)
MAX_CACHED_URL_CHARS = 2048  # parsed URLs and EndpointPolicy's answers are kept up to this long


def normalize_url(url: str) -> NormalizedURL:
    """Parse and normalize an http(s) URL; raises `InvalidEndpoint`."""
    url = url.strip()
    return _parse_cached(url) if len(url) <= MAX_CACHED_URL_CHARS else _parse(url)


def url_host_port(url: str) -> tuple[str, int] | None:
    """The host (normalized, lower case) and port (the scheme's default when none is written) of
    an http(s) URL; None when it is not one. For rules that recognise a server by where a URL
    goes: they compare parsed hosts and ports, never substrings of the URL text, so a look-alike
    (`evil-nebius.com.attacker.net`, a path `/nebius.com/`, a port `:12345`) does not match."""
    if not url:
        return None
    try:
        parsed = normalize_url(url)
    except InvalidEndpoint:
        return None
    return parsed.host, parsed.port


def url_in_domain(url: str, domain: str) -> bool:
    """Whether the URL's host is `domain` (lower case) or a name under it."""
    where = url_host_port(url)
    return where is not None and (where[0] == domain or where[0].endswith("." + domain))


_USERINFO = re.compile(r"//[^/?#]*@")


def safe_display(url: str) -> str:
    """A URL fit for an error message: no userinfo, no query or fragment, bounded length."""
    try:
        return normalize_url(url).display
    except InvalidEndpoint:
        text = _USERINFO.sub("//", url.split("?", 1)[0].split("#", 1)[0])
        text = _BAD_CHARS.sub(lambda m: f"%{ord(m.group()):02X}", text)
        return text[:200]


def key_allowed_for(url: str, key_base_url: str) -> bool:
    """May a key held for `key_base_url` be sent with a request to `url`? (Never on a parse error.)"""
    try:
        target, base = normalize_url(url), normalize_url(key_base_url)
    except InvalidEndpoint:
        return False
    return not target.forbidden and target.is_under(base)


class EndpointPolicy:
    """The allowlist of upstream base URLs; `check` raises `EndpointNotAllowed` for anything else."""

    def __init__(
        self,
        *,
        provider_base_urls: Sequence[str] = (),
        allowed_endpoints: Sequence[str] = (),
        allow_private_byok: bool = False,
    ) -> None:
        self.allow_private_byok = allow_private_byok
        bases: list[NormalizedURL] = []
        for source, urls in (
            ("provider base URL", provider_base_urls),
            ("LLMGW_ALLOWED_ENDPOINTS", allowed_endpoints),
        ):
            for url in urls:
                if not url.strip():
                    continue
                try:
                    base = normalize_url(url)
                except InvalidEndpoint as exc:
                    raise ValueError(f"{source} entry {safe_display(url)!r} is not usable: {exc}") from None
                if base.forbidden:
                    log.warning(
                        "%s entry %s is a link-local or cloud-metadata address and stays refused",
                        source,
                        base.display,
                    )
                bases.append(base)
        self.bases: tuple[NormalizedURL, ...] = tuple(bases)
        # url -> canonical URL, for URLs allowed by the fixed lists alone (the common case: every
        # request of an agent names the same endpoint). Refusals are not cached.
        self._allowed: dict[str, str] = {}
        # url -> operator_listed(url): the lists are fixed, and every call asks it of its URL
        # (walking every base, a dozen with the default provider URLs).
        self._listed: dict[str, bool] = {}
        # Both hold at most 4,096 URLs of at most MAX_CACHED_URL_CHARS each: nothing bounds a
        # request's model_endpoint below the 64 MiB gRPC limit, and a URL under a listed base
        # may have any path, so a longer one is judged every time instead of being kept.

    @classmethod
    def from_settings(cls, settings: Settings, *, allow_private_byok: bool = False) -> EndpointPolicy:
        return cls(
            provider_base_urls=settings.provider_base_urls(),
            allowed_endpoints=settings.allowed_endpoints,
            allow_private_byok=allow_private_byok,
        )

    def _byok_bases(self, urls: Iterable[str]) -> Iterable[NormalizedURL]:
        for url in urls:
            try:
                base = normalize_url(url)
            except InvalidEndpoint:
                continue
            if self.allow_private_byok or not base.is_local_or_private:
                yield base

    def check(self, url: str, *, byok_base_urls: Sequence[str] = ()) -> str:
        """Raise `EndpointNotAllowed` unless `url` is allowed; returns the canonical URL to use."""
        allowed = self._allowed.get(url)
        if allowed is not None:
            return allowed
        try:
            target = normalize_url(url)
        except InvalidEndpoint as exc:
            raise EndpointNotAllowed(
                f"endpoint {safe_display(url)} is not allowed: {exc}",
                metadata={"endpoint": safe_display(url)},
            ) from None
        if target.forbidden:
            raise EndpointNotAllowed(
                f"endpoint {target.display} is a link-local or cloud-metadata address and is never allowed",
                metadata={"endpoint": target.display},
            )
        if any(target.is_under(base) for base in self.bases):
            if len(url) <= MAX_CACHED_URL_CHARS:
                if len(self._allowed) >= 4096:
                    self._allowed.clear()
                self._allowed[url] = target.canonical
            return target.canonical
        if any(target.is_under(base) for base in self._byok_bases(byok_base_urls)):
            return target.canonical
        raise EndpointNotAllowed(
            f"endpoint {target.display} is not allowed: it is not under a configured provider base URL, "
            "LLMGW_ALLOWED_ENDPOINTS or one of the organization's providers",
            metadata={"endpoint": target.display},
        )

    def operator_listed(self, url: str) -> bool:
        """May a call to `url` connect to loopback and private addresses? (The connect-time rule.)

        Only when the operator listed it: under a configured provider base URL or an
        `LLMGW_ALLOWED_ENDPOINTS` entry (or `allow_private_byok` is set). A URL allowed only as
        an organization's BYOK base URL is a tenant's choice: whatever its host name resolves
        to, it may reach public addresses only.
        """
        if self.allow_private_byok:
            return True
        listed = self._listed.get(url)
        if listed is None:
            try:
                target = normalize_url(url)
            except InvalidEndpoint:
                return False
            listed = any(target.is_under(base) for base in self.bases)
            if len(url) <= MAX_CACHED_URL_CHARS:
                if len(self._listed) >= 4096:
                    self._listed.clear()
                self._listed[url] = listed
        return listed

    def validate_byok_base_url(self, url: str) -> str:
        """Canonical form of a BYOK base URL being registered; raises `EndpointNotAllowed` if unusable."""
        try:
            base = normalize_url(url)
        except InvalidEndpoint as exc:
            raise EndpointNotAllowed(
                f"provider base URL {safe_display(url)} is not usable: {exc}",
                metadata={"endpoint": safe_display(url)},
            ) from None
        if base.forbidden:
            raise EndpointNotAllowed(
                f"provider base URL {base.display} is a link-local or cloud-metadata address",
                metadata={"endpoint": base.display},
            )
        if (
            base.is_local_or_private
            and not self.allow_private_byok
            and not any(base.is_under(b) for b in self.bases)
        ):
            raise EndpointNotAllowed(
                f"provider base URL {base.display} is a loopback or private address; the operator must "
                "list it in LLMGW_ALLOWED_ENDPOINTS",
                metadata={"endpoint": base.display},
            )
        if base.query:
            raise EndpointNotAllowed(
                f"provider base URL {base.display} must not carry a query string",
                metadata={"endpoint": base.display},
            )
        return base.canonical

    key_allowed_for = staticmethod(key_allowed_for)
