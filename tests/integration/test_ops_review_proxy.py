"""Review of issue 15 item 7 (egress proxy) as an attacker on the network and a careless operator.

- A proxy that answers CONNECT with 407, 502, garbage or nothing at all: a connect error (or the
  call's deadline, honoured) that names neither the proxy's address nor its password.
- A proxy that closes the tunnel in the middle of an answer: an error, never a short answer
  (sized body and chunked stream).
- The CONNECT request carries the proxy's credentials and nothing else of the call: no upstream
  key, no request header.
- A garbled proxy URL refuses to start without echoing its password (a `/`, `#`, `?` or `[` in
  an unencoded password used to put it in the error message).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from server.auth.resolver import SafeResolver
from server.providers.http import HttpClientError, Timeout
from server.providers.proxy import ProxyConfig
from tests.egress_proxy import RecordingProxy
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
SERVER_KEY = "sk-server-held-KEY-0123456789"

ProxyHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_proxy(handler: ProxyHandler) -> AsyncIterator[int]:
    """A proxy on loopback that reads the CONNECT head and lets `handler` answer it."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _answer(data: bytes) -> ProxyHandler:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.2)

    return handler


async def _silent(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)  # accepts, reads the CONNECT, never answers


def _config(port: int) -> ProxyConfig:
    config = ProxyConfig.from_environ({"HTTPS_PROXY": f"http://gw:{PASSWORD}@127.0.0.1:{port}"})
    assert config is not None
    return config


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="x"\r\n\r\n',
            "refused the tunnel to .*: 407 Proxy Authentication Required",
        ),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", ": 502 Bad Gateway"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "did not answer CONNECT with HTTP"),
        (b"HTTP/1.1 200 OK\r\n", "closed the connection during CONNECT"),  # cut before the blank line
        (b"HTTP/1.1 200 " + b"x" * 40_000, "too long"),
    ],
)
async def test_a_misbehaving_proxy_is_a_connect_error_naming_nothing_of_it(
    answer: bytes, message: str
) -> None:
    async with scripted_proxy(_answer(answer)) as port:
        resolver = SafeResolver(StaticLookup("93.184.216.34"))
        async with open_client(resolver=resolver, proxies=_config(port)) as http:
            with pytest.raises(HttpClientError, match=message) as refused:
                await http.post("https://api.example/v1/chat/completions", b"{}", {}, BOUNDED)
    text = str(refused.value)
    assert PASSWORD not in text and str(port) not in text and "127.0.0.1" not in text, text


async def test_a_silent_proxy_is_bounded_by_the_deadline() -> None:
    async with scripted_proxy(_silent) as port:
        resolver = SafeResolver(StaticLookup("93.184.216.34"))
        async with open_client(resolver=resolver, proxies=_config(port)) as http:
            started = time.monotonic()
            with pytest.raises((HttpClientError, TimeoutError)) as timed_out:
                await http.post(
                    "https://api.example/v1/chat/completions", b"{}", {}, Timeout(total=1.0, idle=1.0)
                )
            took = time.monotonic() - started
    assert took < 3.0, took  # the 1 s bound, not the proxy's 30 s
    assert PASSWORD not in str(timed_out.value) and str(port) not in str(timed_out.value)


def _cutting_proxy(target_port: int, keep: int) -> ProxyHandler:
    """Tunnels to the upstream, then closes both sides after `keep` bytes of its answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def upward() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)

        pump = asyncio.create_task(upward())
        sent = 0
        while sent < keep and (data := await up_reader.read(min(65536, keep - sent))):
            writer.write(data)
            await writer.drain()
            sent += len(data)
        pump.cancel()
        up_writer.close()
        writer.transport.abort()

    return handler


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_proxy_closing_mid_answer_is_an_error_never_a_short_answer(chunked: bool) -> None:
    body = b'{"content": "' + b"a" * 20_000 + b'"}'
    if chunked:
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
        )
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
            + chunks
            + b"0\r\n\r\n"
        )
    else:
        answer = http_answer(body)
    async with (
        raw_server(replying(answer)) as server,
        scripted_proxy(_cutting_proxy(server.port, 5_000)) as port,
    ):
        config = ProxyConfig.from_environ({"HTTP_PROXY": f"http://127.0.0.1:{port}"})
        resolver = SafeResolver(StaticLookup("93.184.216.34"))
        async with open_client(resolver=resolver, proxies=config) as http:
            response = await http.post("http://api.example/v1/chat/completions", b"{}", {}, BOUNDED)
            with pytest.raises(HttpClientError):
                await response.read(LIMIT)


async def test_the_connect_request_carries_no_upstream_key_or_header() -> None:
    async with (
        raw_server(replying(http_answer(b'{"ok": 1}'))) as server,
        RecordingProxy(server.port) as proxy,
    ):
        config = ProxyConfig.from_environ({"HTTP_PROXY": f"http://gw:{PASSWORD}@127.0.0.1:{proxy.port}"})
        resolver = SafeResolver(StaticLookup("93.184.216.34"))
        headers = {"Authorization": f"Bearer {SERVER_KEY}", "x-api-key": SERVER_KEY, "X-Custom": "tenant"}
        async with open_client(resolver=resolver, proxies=config) as http:
            response = await http.post("http://api.example/v1/chat/completions", b"{}", headers, BOUNDED)
            assert await response.read(LIMIT) == b'{"ok": 1}'
    ((authority, connect_headers),) = proxy.requests
    assert set(connect_headers) == {"host", "proxy-authorization"}, connect_headers
    assert SERVER_KEY not in repr(connect_headers) and "tenant" not in repr(connect_headers)
    assert server.requests[0].header("authorization") == f"Bearer {SERVER_KEY}"  # the key went upstream only


@pytest.mark.parametrize(
    "url",
    [
        f"http://gw:pa/ss-{PASSWORD}@proxy:3128",
        f"http://gw:{PASSWORD}@[proxy:3128",
        f"http://gw:{PASSWORD}#x@proxy:3128",
        f"http://gw:{PASSWORD}?x@proxy:3128",
        f"http://gw:{PASSWORD}@proxy:notaport",
        f"socks5://gw:{PASSWORD}@proxy:1080",
    ],
)
def test_a_garbled_proxy_url_is_refused_without_its_password(url: str) -> None:
    for variable in ("HTTPS_PROXY", "http_proxy"):
        with pytest.raises(ValueError, match=variable) as refused:
            ProxyConfig.from_environ({variable: url})
        assert PASSWORD not in str(refused.value), refused.value
        assert "ss-" not in str(refused.value)  # nor a piece of it


@pytest.mark.parametrize("entry", ["internal:²", "internal:٣١٢٨", "internal:x"])
def test_a_no_proxy_port_that_is_not_ascii_digits_is_refused_naming_no_proxy(entry: str) -> None:
    # "²".isdigit() is True but int() refuses it: the error named no variable.
    with pytest.raises(ValueError, match="NO_PROXY: .* is not host\\[:port\\]"):
        ProxyConfig.from_environ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": entry})
