"""Issue 15, item 7: egress through HTTPS_PROXY / HTTP_PROXY / NO_PROXY, with real proxies on
loopback (Debian's tinyproxy, and a recording CONNECT proxy) and the TLS test certificates.

- https targets go through a CONNECT tunnel with end-to-end TLS, verified against the target's
  name; the proxy's credentials go to the proxy only (never to the upstream, never in an error);
- the SSRF guard checks the target, not the proxy: a tenant's target resolving to a metadata or
  private address is refused before the proxy is asked, and a tenant's target is tunnelled to the
  address the gateway vetted (no second lookup by the proxy); an operator-listed one by name;
- NO_PROXY targets go direct; no proxy variable, no proxy;
- a garbled proxy setting refuses to start, naming the variable;
- end to end: a gateway process with HTTPS_PROXY reaches a TLS upstream through tinyproxy and its
  log never shows the proxy password.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from llmgateway.v1 import chat_pb2_grpc

from server.auth.resolver import ForbiddenAddressError, SafeResolver
from server.providers.http import ConnectError
from server.providers.proxy import ProxyConfig
from tests.egress_proxy import RecordingProxy, tinyproxy
from tests.fake_upstream import completion
from tests.gateway_harness import chat_request
from tests.process_harness import REPO_ROOT, async_server_process, clean_env
from tests.tls_certs import CertFiles, make_certs
from tests.unit.test_http_client import (
    BOUNDED,
    LIMIT,
    StaticLookup,
    http_answer,
    open_client,
    raw_server,
    replying,
)

PASSWORD = "pr0xy-S3cret-value"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(Path(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def server_tls(certs: CertFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    return context


def proxies(**environ: str) -> ProxyConfig:
    config = ProxyConfig.from_environ(environ)
    assert config is not None
    return config


async def test_https_through_tinyproxy_with_credentials(
    tmp_path: Path, certs: CertFiles, server_tls: ssl.SSLContext
) -> None:
    with tinyproxy(tmp_path / "tp", basic_auth=("gw", PASSWORD)) as proxy:
        async with raw_server(replying(http_answer(b'{"via": "tunnel"}')), ssl_context=server_tls) as server:
            trusting = ssl.create_default_context(cafile=str(certs.ca_cert))
            config = proxies(HTTPS_PROXY=f"http://gw:{PASSWORD}@127.0.0.1:{proxy.port}")
            resolver = SafeResolver(StaticLookup("127.0.0.1"))
            async with open_client(ssl_context=trusting, resolver=resolver, proxies=config) as http:
                for _ in range(2):  # the tunnel is kept alive like a direct connection
                    response = await http.post(
                        server.url(scheme="https", host="localhost"), b"{}", {}, BOUNDED, private_ok=True
                    )
                    assert await response.read(LIMIT) == b'{"via": "tunnel"}'
                assert http.connections_idle == 1
            # Wrong credentials: a connect error naming the proxy's answer (tinyproxy says 401, not
            # 407), never the password.
            bad = proxies(HTTPS_PROXY=f"http://gw:wrong-{PASSWORD}@127.0.0.1:{proxy.port}")
            async with open_client(ssl_context=trusting, resolver=resolver, proxies=bad) as http:
                with pytest.raises(ConnectError, match="refused the tunnel.*: 40[17] ") as refused:
                    await http.post(
                        server.url(scheme="https", host="localhost"), b"{}", {}, BOUNDED, private_ok=True
                    )
            assert PASSWORD not in str(refused.value)
            assert str(proxy.port) not in str(
                refused.value
            )  # the proxy's address is not the caller's business
        connects = proxy.connects()
    assert server.connections == 1 and len(server.requests) == 2
    # TLS end to end: the upstream never saw the proxy's header, the proxy saw one CONNECT by name
    # (an operator-listed target), plus the refused one.
    assert all(r.header("proxy-authorization") is None for r in server.requests)
    assert connects[0] == f"localhost:{server.port}", connects
    assert PASSWORD not in proxy.log()


async def test_an_untrusted_certificate_through_the_tunnel_is_refused(
    tmp_path: Path, server_tls: ssl.SSLContext
) -> None:
    with tinyproxy(tmp_path / "tp") as proxy:
        async with raw_server(replying(http_answer(b"{}")), ssl_context=server_tls) as server:
            resolver = SafeResolver(StaticLookup("127.0.0.1"))
            config = proxies(HTTPS_PROXY=proxy.url)
            async with open_client(resolver=resolver, proxies=config) as http:  # the test CA is not trusted
                with pytest.raises(ConnectError, match="(?i)certificate"):
                    await http.post(
                        server.url(scheme="https", host="localhost"), b"{}", {}, BOUNDED, private_ok=True
                    )
    assert server.requests == []


@pytest.mark.parametrize("forbidden", ["169.254.169.254", "10.1.2.3", "127.0.0.1"])
async def test_a_tenant_target_on_a_forbidden_address_is_refused_before_the_proxy(
    tmp_path: Path, forbidden: str
) -> None:
    with tinyproxy(tmp_path / "tp") as proxy:
        config = proxies(HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url)
        resolver = SafeResolver(StaticLookup(forbidden))
        async with open_client(resolver=resolver, proxies=config) as http:
            for url in (
                "https://tenant.example/v1/chat/completions",
                "http://tenant.example/v1/chat/completions",
            ):
                with pytest.raises(ForbiddenAddressError):
                    await http.post(url, b"{}", {}, BOUNDED, private_ok=False)
        await asyncio.sleep(0.2)
        assert proxy.connects() == []  # the proxy was never asked


async def test_a_tenant_target_is_tunnelled_to_the_vetted_address_not_its_name() -> None:
    async with (
        raw_server(replying(http_answer(b'{"ok": 1}'))) as server,
        RecordingProxy(server.port) as proxy,
    ):
        config = proxies(http_proxy=f"http://gw:{PASSWORD}@127.0.0.1:{proxy.port}")
        # The name resolves (for the gateway) to a public address; the proxy is asked for that one.
        resolver = SafeResolver(StaticLookup("93.184.216.34"))
        async with open_client(resolver=resolver, proxies=config) as http:
            response = await http.post("http://rebind.example/v1/chat/completions", b"{}", {}, BOUNDED)
            assert await response.read(LIMIT) == b'{"ok": 1}'
    ((authority, headers),) = proxy.requests
    assert authority == "93.184.216.34:80"
    assert headers["proxy-authorization"].startswith("Basic ")
    # Inside the tunnel: the request names the target, and carries no proxy credentials.
    assert server.requests[0].header("host") == "rebind.example"
    assert server.requests[0].header("proxy-authorization") is None


async def test_no_proxy_targets_go_direct(tmp_path: Path) -> None:
    async with (
        raw_server(replying(http_answer(b'{"direct": true}'))) as server,
        RecordingProxy(server.port) as proxy,
    ):
        resolver = SafeResolver(StaticLookup("127.0.0.1"))
        for no_proxy in ("localhost", ".localhost", "127.0.0.0/8", f"localhost:{server.port}", "*"):
            config = proxies(HTTP_PROXY=proxy.url, NO_PROXY=no_proxy)
            async with open_client(resolver=resolver, proxies=config) as http:
                host = "127.0.0.1" if "/" in no_proxy else "localhost"
                response = await http.post(server.url(host=host), b"{}", {}, BOUNDED, private_ok=True)
                assert await response.read(LIMIT) == b'{"direct": true}'
        # A NO_PROXY entry for another port does not match.
        config = proxies(HTTP_PROXY=proxy.url, NO_PROXY="localhost:1")
        async with open_client(resolver=resolver, proxies=config) as http:
            response = await http.post(server.url(host="localhost"), b"{}", {}, BOUNDED, private_ok=True)
            assert await response.read(LIMIT) == b'{"direct": true}'
    assert [a for a, _ in proxy.requests] == [f"localhost:{server.port}"]


def test_proxy_variables_are_off_unless_set_and_garbled_ones_are_named() -> None:
    assert ProxyConfig.from_environ({}) is None
    assert ProxyConfig.from_environ({"NO_PROXY": "x"}) is None
    # Lowercase wins, as in curl and urllib.
    config = proxies(HTTPS_PROXY="http://upper:1", https_proxy="lower:3128")
    assert config.https is not None and (config.https.host, config.https.port) == ("lower", 3128)
    for env, variable in (
        ({"HTTPS_PROXY": "socks5://127.0.0.1:1080"}, "HTTPS_PROXY"),
        ({"HTTPS_PROXY": "https://proxy:443"}, "HTTPS_PROXY"),
        ({"http_proxy": "http://proxy:99999"}, "http_proxy"),
        ({"HTTP_PROXY": "http://proxy:3128/path"}, "HTTP_PROXY"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "host:port"}, "NO_PROXY"),
    ):
        with pytest.raises(ValueError, match=variable):
            ProxyConfig.from_environ(env)
    with pytest.raises(ValueError) as garbled:
        ProxyConfig.from_environ({"HTTPS_PROXY": f"ftp://u:{PASSWORD}@proxy:21"})
    assert PASSWORD not in str(garbled.value)
    assert PASSWORD not in repr(proxies(HTTPS_PROXY=f"http://u:{PASSWORD}@proxy:3128"))


def test_a_garbled_proxy_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--sqlite-path",
            str(tmp_path / "g.db"),
        ],
        cwd=REPO_ROOT,
        env=clean_env({"HTTPS_PROXY": f"socks5://u:{PASSWORD}@127.0.0.1:1080"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot start: HTTPS_PROXY: only http://host:port proxies are supported" in done.stderr
    assert PASSWORD not in done.stderr


async def _tls_upstream(certs: CertFiles) -> AsyncIterator[int]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(completion("through the proxy"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    assert site._server is not None  # noqa: SLF001 - aiohttp has no public accessor for the port
    try:
        yield site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    finally:
        await runner.cleanup()


async def test_a_gateway_process_reaches_a_tls_upstream_through_tinyproxy(
    tmp_path: Path, certs: CertFiles
) -> None:
    upstreams = _tls_upstream(certs)
    port = await upstreams.__anext__()
    try:
        with tinyproxy(tmp_path / "tp", basic_auth=("gw", PASSWORD)) as proxy:
            base_url = f"https://localhost:{port}/v1"
            env = {
                "HTTPS_PROXY": f"http://gw:{PASSWORD}@127.0.0.1:{proxy.port}",
                "SSL_CERT_FILE": str(certs.ca_cert),
                "OPENAI_API_KEY": "sk-operator-key-0123456789",
            }
            async with async_server_process(tmp_path, env=env, allowed_endpoints=[base_url]) as server:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                    answer = await stub.Create(chat_request(base_url), timeout=20)
            connects = proxy.connects()
    finally:
        await upstreams.aclose()
    assert answer.completion.choices[0].message.content == "through the proxy"
    assert connects == [f"localhost:{port}"]
    assert f"egress through a proxy: https via http://gw:***@127.0.0.1:{proxy.port}" in server.log
    assert PASSWORD not in server.log
