"""Endpoint policy (server.auth.endpoints): allowlists, normalization, always-forbidden addresses."""

from __future__ import annotations

import ipaddress

import pytest

from server.auth.endpoints import (
    EndpointPolicy,
    InvalidEndpoint,
    is_forbidden_address,
    key_allowed_for,
    normalize_url,
    safe_display,
    url_host_port,
    url_in_domain,
)
from server.config import Settings
from server.errors import EndpointNotAllowed


def allowed(policy: EndpointPolicy, url: str, *, byok_base_urls: tuple[str, ...] = ()) -> bool:
    """Whether `EndpointPolicy.check` (what every call goes through) lets the URL through."""
    try:
        policy.check(url, byok_base_urls=byok_base_urls)
    except EndpointNotAllowed:
        return False
    return True


POLICY = EndpointPolicy(
    provider_base_urls=("https://api.openai.com/v1", "https://openrouter.ai/api/v1"),
    allowed_endpoints=(
        "http://127.0.0.1:11434",
        "http://localhost:8000/v1/",
        "https://llm.internal.example:8443/base",
        "http://[::1]:9000",
        "http://169.254.169.254/",  # listed, but refused always
        "http://metadata.google.internal",
    ),
)
BYOK = ("https://byok.example.com/v1", "http://10.0.0.5:8000/v1")

ALLOWED = [
    "https://api.openai.com/v1",
    "https://api.openai.com/v1/",
    "https://API.OPENAI.COM/v1",
    "HTTPS://api.openai.com/v1",
    "https://api.openai.com:443/v1",
    "https://api.openai.com./v1",
    "https://api.openai.com/v1/chat/completions",
    "https://api.openai.com/v1?api-version=1",
    "https://openrouter.ai/api/v1",
    "http://127.0.0.1:11434",
    "http://127.0.0.1:11434/",
    "http://127.0.0.1:11434/v1",
    "http://127.1:11434/v1",  # short form of 127.0.0.1
    "http://2130706433:11434/",  # decimal form of 127.0.0.1
    "http://0x7f000001:11434/",  # hex form
    "http://localhost:8000/v1",
    "http://LOCALHOST:8000/v1/models",
    "https://llm.internal.example:8443/base/x",
    "http://[::1]:9000/v1",
    "http://[0:0:0:0:0:0:0:1]:9000/v1",
    "https://byok.example.com/v1",
    "https://byok.example.com/v1/chat",
]

REFUSED = [
    # Not under any base.
    "https://evil.com/v1",
    "https://api.openai.com.evil.com/v1",
    "https://api.openai.com/v10",
    "https://api.openai.com/v",
    "https://api.openai.com/",
    "https://api.openai.com",
    "https://api.openai.com/V1",  # paths are case-sensitive
    "http://api.openai.com/v1",  # scheme matters
    "https://api.openai.com:8443/v1",  # port matters
    "http://127.0.0.1:11435",
    "http://127.0.0.2:11434",
    "http://localhost:8000/v2",
    "http://localhost:8000",
    "https://llm.internal.example/base",  # default port 443 != 8443
    "https://llm.internal.example:8443/basement",
    "http://[::1]:9001/",
    "https://evilopenai.com/v1",
    # Userinfo and parser tricks.
    "https://api.openai.com@evil.com/v1",
    "https://api.openai.com:443@evil.com/v1",
    "https://user:pass@api.openai.com/v1",
    "https://api.openai.com\\@evil.com/v1",
    "https://api.openai.com\\.evil.com/v1",
    "https://api.openai.com /v1",
    "https://api.openai.com\t.evil.com/v1",
    "https://api.openai.com\n/v1",
    "https://api.openai.com%2f@evil.com/v1",
    "https://api.openai.com/v1/../../admin",
    "https://api.openai.com/v1/%2e%2e/admin",
    "https://api.openai.com/v1/%2E%2E%2Fadmin",
    "https://api.openai.com/v1/./x",
    "https://аpi.openai.com/v1",  # Cyrillic a
    "https:api.openai.com/v1",
    "https:///api.openai.com/v1",
    "//api.openai.com/v1",
    "api.openai.com/v1",
    "ftp://api.openai.com/v1",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "",
    "https://api.openai.com:0/v1",
    "https://api.openai.com:65536/v1",
    "https://api.openai.com:+443/v1",
    "https://api.openai.com:44a/v1",
    "https://[::1/v1",
    "https://[fe80::1%25eth0]:9000/",
    "https://api..openai.com/v1",
    "https://api.openai.com.1/v1",  # numeric last label but not an address
    # BYOK private literals grant nothing by default.
    "http://10.0.0.5:8000/v1",
]

ALWAYS_FORBIDDEN = [
    "http://169.254.169.254/",
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials",
    "http://169.254.1.1/",
    "http://2852039166/",  # decimal 169.254.169.254
    "http://0xa9fea9fe/",  # hex
    "http://0xA9FEA9FE/",
    "http://0251.0376.0251.0376/",  # octal
    "http://169.254.43518/",  # short form
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.254.169.254.:80/",
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64
    "http://[2002:a9fe:a9fe::]/",  # 6to4
    "http://[fe80::1]/",
    "http://[FE80::abcd]:9000/",
    "http://[febf::1]/",
    "http://[fd00:ec2::254]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL./",
    "http://metadata.goog/",
    "http://100.100.100.200/latest/meta-data/",
]


@pytest.mark.parametrize("url", ALLOWED)
def test_allowed(url: str) -> None:
    canonical = POLICY.check(url, byok_base_urls=BYOK)
    assert allowed(POLICY, canonical, byok_base_urls=BYOK)  # the canonical form stays allowed


@pytest.mark.parametrize("url", REFUSED)
def test_refused(url: str) -> None:
    with pytest.raises(EndpointNotAllowed) as info:
        POLICY.check(url, byok_base_urls=BYOK)
    assert info.value.reason == "ENDPOINT_NOT_ALLOWED"
    assert "endpoint" in info.value.metadata


@pytest.mark.parametrize("url", ALWAYS_FORBIDDEN)
def test_always_forbidden_even_when_listed(url: str) -> None:
    everything = EndpointPolicy(
        allowed_endpoints=(
            url,
            "http://169.254.169.254",
            "http://[fe80::1]",
            "http://metadata.google.internal",
        ),
        allow_private_byok=True,
    )
    with pytest.raises(EndpointNotAllowed, match="link-local or cloud-metadata|not allowed"):
        everything.check(url, byok_base_urls=(url,))
    assert normalize_url(url).forbidden


def test_canonical_url() -> None:
    assert POLICY.check("HTTPS://API.OpenAI.com.:443/v1/") == "https://api.openai.com/v1"
    assert POLICY.check("http://2130706433:11434/v1") == "http://127.0.0.1:11434/v1"
    assert (
        POLICY.check("https://api.openai.com/v1?api-version=2") == "https://api.openai.com/v1?api-version=2"
    )
    assert POLICY.check("https://api.openai.com/v1#frag") == "https://api.openai.com/v1"


def test_error_metadata_strips_userinfo_and_query() -> None:
    with pytest.raises(EndpointNotAllowed) as info:
        POLICY.check("https://evil.com/v1?key=sk-SECRET123456")
    assert info.value.metadata == {"endpoint": "https://evil.com/v1"}
    assert "SECRET" not in info.value.message
    with pytest.raises(EndpointNotAllowed) as info:
        POLICY.check("https://user:hunter22@evil.com/v1?token=abc")
    assert "hunter22" not in info.value.message and "hunter22" not in str(info.value.metadata)
    assert "abc" not in info.value.metadata["endpoint"]


@pytest.mark.parametrize(
    "url", ["https://user:pw@evil.com/x?key=zzz", "not a url @ all?key=zzz", "https://a:pw@[::1/x"]
)
def test_safe_display(url: str) -> None:
    shown = safe_display(url)
    assert "pw" not in shown and "zzz" not in shown


def test_private_byok_urls_need_the_operator() -> None:
    policy = EndpointPolicy(provider_base_urls=("https://api.openai.com/v1",))
    for url in (
        "http://10.0.0.5:8000/v1",
        "http://127.0.0.1:8000/v1",
        "http://localhost:1/v1",
        "http://[::1]/",
    ):
        with pytest.raises(EndpointNotAllowed):
            policy.check(url, byok_base_urls=(url,))
        with pytest.raises(EndpointNotAllowed, match="LLMGW_ALLOWED_ENDPOINTS"):
            policy.validate_byok_base_url(url)
    lenient = EndpointPolicy(allow_private_byok=True)
    assert lenient.check("http://10.0.0.5:8000/v1/x", byok_base_urls=("http://10.0.0.5:8000/v1",))
    listed = EndpointPolicy(allowed_endpoints=("http://10.0.0.5:8000",))
    assert listed.validate_byok_base_url("http://10.0.0.5:8000/v1/") == "http://10.0.0.5:8000/v1"


def test_validate_byok_base_url() -> None:
    assert POLICY.validate_byok_base_url("https://Byok.Example.com/v1/") == "https://byok.example.com/v1"
    for bad in (
        "http://169.254.169.254/",
        "https://a@b.com/",
        "ftp://x.com/",
        "https://x.com/v1?k=1",
        "nope",
    ):
        with pytest.raises(EndpointNotAllowed):
            POLICY.validate_byok_base_url(bad)


def test_invalid_allowlist_entry_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="LLMGW_ALLOWED_ENDPOINTS"):
        EndpointPolicy(allowed_endpoints=("https://user:secretpw@x.com",))
    try:
        EndpointPolicy(allowed_endpoints=("https://user:secretpw@x.com",))
    except ValueError as exc:
        assert "secretpw" not in str(exc)


def test_from_settings() -> None:
    policy = EndpointPolicy.from_settings(Settings(allowed_endpoints=("http://127.0.0.1:8080/v1",)))
    assert allowed(policy, "https://api.openai.com/v1")
    assert allowed(policy, "https://openrouter.ai/api/v1")
    assert allowed(policy, "http://127.0.0.1:8080/v1/chat/completions")
    assert not allowed(policy, "http://127.0.0.1:8080/")


@pytest.mark.parametrize(
    ("url", "key_base", "expected"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1", True),
        ("https://API.openai.com:443/v1/", "https://api.openai.com/v1", True),
        ("https://api.openai.com/v1/x", "https://api.openai.com/v1", True),
        ("https://openrouter.ai/api/v1", "https://api.openai.com/v1", False),
        ("https://api.openai.com.evil.com/v1", "https://api.openai.com/v1", False),
        ("https://api.openai.com@evil.com/v1", "https://api.openai.com/v1", False),
        ("https://api.openai.com/v10", "https://api.openai.com/v1", False),
        ("http://api.openai.com/v1", "https://api.openai.com/v1", False),
        ("http://127.0.0.1:11434", "https://api.openai.com/v1", False),
        ("garbage", "https://api.openai.com/v1", False),
    ],
)
def test_key_allowed_for(url: str, key_base: str, expected: bool) -> None:
    assert key_allowed_for(url, key_base) is expected
    assert POLICY.key_allowed_for(url, key_base) is expected


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("169.254.169.254", True),
        ("169.254.0.1", True),
        ("100.100.100.200", True),
        ("fd00:ec2::254", True),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("[fe80::1]", True),
        ("::ffff:169.254.169.254", True),
        ("64:ff9b::a9fe:a9fe", True),
        ("2002:a9fe:a9fe::1", True),
        ("8.8.8.8", False),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("100.100.100.201", False),
        ("::1", False),
        ("2606:4700::1111", False),
        ("not-an-ip", True),  # fail closed
    ],
)
def test_is_forbidden_address(ip: str, expected: bool) -> None:
    assert is_forbidden_address(ip) is expected


def test_is_forbidden_address_accepts_objects() -> None:
    assert is_forbidden_address(ipaddress.ip_address("169.254.169.254"))
    assert not is_forbidden_address(ipaddress.ip_address("1.1.1.1"))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("metadata.google.internal", True),
        ("2852039166", True),
        ("[fe80::1]", True),
        ("api.openai.com", False),
        ("127.0.0.1", False),
    ],
)
def test_forbidden_hosts(host: str, expected: bool) -> None:
    assert normalize_url(f"http://{host}/").forbidden is expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.studio.nebius.com/v1", ("api.studio.nebius.com", 443)),
        ("http://LOCALHOST:1234/v1", ("localhost", 1234)),
        ("http://[::1]:8080", ("::1", 8080)),
        ("http://127.0.0.1/v1", ("127.0.0.1", 80)),
        ("", None),
        ("localhost:1234", None),  # no scheme: not a URL that goes anywhere
        ("http://bad host/", None),
    ],
)
def test_url_host_port(url: str, expected: tuple[str, int] | None) -> None:
    assert url_host_port(url) == expected


def test_url_in_domain_matches_whole_labels() -> None:
    assert url_in_domain("https://nebius.com/v1", "nebius.com")
    assert url_in_domain("https://api.studio.NEBIUS.com./v1", "nebius.com")
    for other in (
        "https://evil-nebius.com.attacker.net/v1",
        "https://evilnebius.com/v1",
        "http://127.0.0.1:8000/nebius.com/v1",
        "https://nebius.com.attacker.net/v1",
        "not a url nebius.com",
    ):
        assert not url_in_domain(other, "nebius.com"), other


def test_numeric_host_forms() -> None:
    assert normalize_url("http://0/").host == "0.0.0.0"
    assert normalize_url("http://1.2.3/").host == "1.2.0.3"
    assert normalize_url("http://0x7f.1/").host == "127.0.0.1"
    for bad in ("http://256.1.1.1/", "http://1.2.3.4.5/", "http://08.1.1.1/", "http://4294967296/"):
        with pytest.raises(InvalidEndpoint):
            normalize_url(bad)


def test_the_policy_keeps_no_long_url() -> None:
    """A request's model_endpoint is bounded only by the 64 MiB gRPC limit and any path under a
    listed base is allowed: check and operator_listed answer it, but must not keep it (4,096 of
    them would be gigabytes)."""
    policy = EndpointPolicy(allowed_endpoints=("http://vllm.internal:8000/v1",))
    long_url = "http://vllm.internal:8000/v1/" + "a" * 100_000
    assert policy.check(long_url) == long_url
    assert policy.operator_listed(long_url)
    assert not policy.operator_listed("https://elsewhere.example/" + "b" * 100_000)
    assert policy._allowed == {} and policy._listed == {}
    short = "http://vllm.internal:8000/v1/chat"
    assert policy.check(short) == short and policy.operator_listed(short)
    assert policy._allowed == {short: short} and policy._listed == {short: True}
