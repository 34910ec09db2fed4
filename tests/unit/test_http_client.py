"""HttpClient (server.providers.http) against real servers on loopback that each test starts itself.

Raw `asyncio.start_server` servers script the exact bytes of an answer (framing, 1xx, resets,
malformed answers, slow senders); `aiohttp.web` servers stand for ordinary, well-behaved upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from server.auth.resolver import Address, ForbiddenAddressError, SafeResolver
from server.providers.http import (
    USER_AGENT,
    BodyTooLargeError,
    ConnectError,
    HttpClient,
    HttpClientError,
    IdleTimeoutError,
    InvalidHeaderError,
    InvalidResponseError,
    InvalidURLError,
    Response,
    ServerDisconnectedError,
    Timeout,
    _parse_target,
)
from tests.tls_certs import CertFiles, make_certs

# Generous bounds: a bug fails the test quickly instead of hanging it, and no test relies on them.
BOUNDED = Timeout(total=5.0, idle=3.0)
LIMIT = 1 << 20
CANARY = "sk-CANARY-7f3a9c0e"


# --- a scriptable raw HTTP server ------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server read it off the wire."""

    request_line: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class Peer:
    """One accepted connection, as a handler scripts it."""

    def __init__(self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> Request:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        request = Request(lines[0], headers, b"", head)
        length = request.all("content-length")
        request.body = await self.reader.readexactly(int(length[0])) if length else b""
        self.server.requests.append(request)
        self.server.arrived.set()
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_client_close(self, timeout: float = 5.0) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                with contextlib.suppress(ConnectionError):  # a reset is a close too
                    while await self.reader.read(65536):
                        pass
                self.server.client_gone.set()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.port = 0
        self.connections = 0
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()  # a request was read (tests clear it to wait for the next)
        self.client_gone = asyncio.Event()  # a handler saw the client close its connection
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def url(
        self, path: str = "/v1/chat/completions", *, scheme: str = "http", host: str = "127.0.0.1"
    ) -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.handler(Peer(self, reader, writer))
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the test is over, or the client went away: both are the handler's normal end
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def raw_server(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    server = RawServer(handler, ssl_context=ssl_context)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def http_answer(
    body: bytes = b"",
    *,
    status: str = "200 OK",
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),),
    length: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n" + trailer + b"\r\n"


def replying(*answers: bytes) -> Handler:
    """Answer each request of a connection with the next answer (the last one repeats) until EOF."""

    async def handler(peer: Peer) -> None:
        n = 0
        while True:
            await peer.read_request()
            await peer.send(answers[min(n, len(answers) - 1)])
            n += 1

    return handler


def then_silent(*parts: bytes) -> Handler:
    """Read one request, send `parts` (if any), then send nothing more until the client closes."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        for part in parts:
            await peer.send(part)
        await peer.wait_client_close()

    return handler


@contextlib.asynccontextmanager
async def aiohttp_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An aiohttp.web upstream answering every POST with `handler`; yields its base URL."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient()
    try:
        yield http
    finally:
        await http.close()


@contextlib.asynccontextmanager
async def open_client(**kwargs: Any) -> AsyncIterator[HttpClient]:
    http = HttpClient(**kwargs)
    try:
        yield http
    finally:
        await http.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def read_all_chunks(response: Response) -> list[bytes]:
    chunks = []
    while chunk := await response.read_chunk():
        chunks.append(chunk)
    return chunks


class StaticLookup:
    """A resolver lookup answering every name with fixed addresses, counting the calls."""

    def __init__(self, *addresses: str, delay: float = 0.0) -> None:
        self.addresses = addresses
        self.delay = delay
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in self.addresses]


@contextlib.contextmanager
def no_connection_attempt(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fails the test if the client opens any connection inside the block."""
    calls: list[Any] = []
    loop = asyncio.get_running_loop()

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("the client tried to connect")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "create_connection", refuse)
        yield calls
    assert calls == []


# --- 1. the request and a unary answer ----------------------------------------------------------------


async def test_unary_json_request_and_answer(client: HttpClient) -> None:
    answer = json.dumps({"id": "cmpl-1", "ok": True}).encode()
    async with raw_server(
        replying(http_answer(answer, headers=(("Content-Type", "Application/JSON; charset=utf-8"),)))
    ) as server:
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi \xc3\xa9"}]}'
        response = await client.post(
            server.url("/v1/chat/completions?api-version=2024-01-01"),
            body,
            {"Authorization": "Bearer k-123", "X-Custom": "value with spaces"},
            BOUNDED,
            private_ok=True,
        )
        assert response.status == 200
        assert response.content_type == "application/json"
        assert response.content_length == len(answer)
        assert response.headers["content-type"] == "Application/JSON; charset=utf-8"
        assert json.loads(await response.read(LIMIT)) == {"id": "cmpl-1", "ok": True}

    [request] = server.requests
    assert request.request_line == "POST /v1/chat/completions?api-version=2024-01-01 HTTP/1.1"
    assert request.headers[0] == ("Host", f"127.0.0.1:{server.port}")
    assert request.header("content-length") == str(len(body))
    assert request.header("transfer-encoding") is None
    assert request.header("user-agent") == USER_AGENT
    assert request.header("accept-encoding") == "identity"
    assert request.header("authorization") == "Bearer k-123"
    assert request.header("x-custom") == "value with spaces"
    assert request.body == body


async def test_named_host_and_empty_path() -> None:
    """The Host header carries the URL's name (lower-cased), not the address; no path means "/"."""
    async with raw_server(replying(http_answer(b"{}"))) as server:
        async with open_client(resolver=SafeResolver(StaticLookup("127.0.0.1"))) as http:
            response = await http.post(
                f"http://Example.TEST:{server.port}", b"", {}, BOUNDED, private_ok=True
            )
            await response.read(LIMIT)
    [request] = server.requests
    assert request.request_line == "POST / HTTP/1.1"
    assert request.header("host") == f"example.test:{server.port}"
    assert request.header("content-length") == "0"
    assert request.body == b""


async def test_ipv6_literal_host() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = await asyncio.start_server(_answer_once_on_ipv6, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_client() as http:
            response = await http.post(f"http://[::1]:{port}/v1", b"{}", {}, BOUNDED, private_ok=True)
            assert response.headers["x-host"] == f"[::1]:{port}"
            assert await response.read(LIMIT) == b"{}"
    finally:
        server.close()
        await server.wait_closed()


async def _answer_once_on_ipv6(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        await reader.readexactly(2)
        host = next(line[6:] for line in head.split("\r\n") if line.lower().startswith("host: "))
        writer.write(http_answer(b"{}", headers=(("X-Host", host),)))
        await writer.drain()
        await reader.read()  # until the client closes
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.test:80/x", "example.test"),
        ("https://example.test:443/x", "example.test"),
        ("https://example.test:80/x", "example.test:80"),
        ("https://[::1]:8443/x", "[::1]:8443"),
        ("HTTP://[::1]/x", "[::1]"),
    ],
)
def test_host_header_drops_only_the_default_port(url: str, host: str) -> None:
    assert _parse_target(url).request_line.endswith(f"\r\nHost: {host}\r\n".encode())


async def test_default_headers_are_replaceable_and_overridable() -> None:
    async with raw_server(replying(http_answer(b"{}"))) as server:
        async with open_client(default_headers={"User-Agent": "custom/1"}) as http:
            await (await http.post(server.url(), b"a", {}, BOUNDED, private_ok=True)).read(LIMIT)
            await (
                await http.post(server.url(), b"b", {"User-Agent": "per-call/2"}, BOUNDED, private_ok=True)
            ).read(LIMIT)
    first, second = server.requests
    assert first.header("user-agent") == "custom/1"
    assert first.header("accept-encoding") is None
    assert second.header("user-agent") == "per-call/2"


async def test_aiohttp_upstream_parses_the_request(client: HttpClient) -> None:
    """A strict, independent HTTP server reads exactly what was sent."""
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        raw = await request.read()
        seen.append((request.method, request.path_qs, dict(request.headers), raw))
        return web.json_response({"echo": json.loads(raw)})

    payload = {"messages": [{"content": "x" * 10_000}]}
    async with aiohttp_server(echo) as base:
        response = await client.post(
            f"{base}/v1/echo?a=1",
            json.dumps(payload).encode(),
            {"Content-Type": "application/json"},
            BOUNDED,
            private_ok=True,
        )
        assert response.status == 200
        assert response.content_type == "application/json"
        assert json.loads(await response.read(LIMIT)) == {"echo": payload}
    [(method, path, headers, raw)] = seen
    assert (method, path) == ("POST", "/v1/echo?a=1")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(raw) == payload


# --- 2. framing ----------------------------------------------------------------------------------


async def test_chunked_body_read_whole(client: HttpClient) -> None:
    answer = http_answer(chunked(b'{"a": ', b"1}"), headers=(("Transfer-Encoding", "chunked"),), length=False)
    async with raw_server(replying(answer)) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert response.content_length is None
        assert await response.read(LIMIT) == b'{"a": 1}'
        assert client.connections_idle == 1  # a chunked answer leaves the connection reusable


async def test_chunked_body_read_in_chunks_as_it_arrives(client: HttpClient) -> None:
    step = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False))
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            await peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            await step.wait()
            step.clear()
        await peer.send(b"0\r\nX-Trailer: t\r\n\r\n")
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert response.status == 200
        assert await response.read_chunk() == b"data: one\n\n"
        assert client.connections_in_use == 1
        step.set()
        assert await response.read_chunk() == b"data: two\n\n"
        step.set()
        assert await response.read_chunk() == b""
        assert await response.read_chunk() == b""  # stays at the end
        response.release()
        assert client.connections_in_use == 0
        assert client.connections_idle == 1  # trailers did not spoil the connection


async def test_aiohttp_streamed_chunks(client: HttpClient) -> None:
    events = [f"data: {n}\n\n".encode() for n in range(20)]

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    async with aiohttp_server(stream) as base:
        response = await client.post(f"{base}/v1/stream", b"{}", {}, BOUNDED, private_ok=True)
        assert response.content_type == "text/event-stream"
        assert b"".join(await read_all_chunks(response)) == b"".join(events)
        response.release()
        assert client.connections_idle == 1


async def test_body_delimited_by_connection_close(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"part one, ", length=False))
        await asyncio.sleep(0.02)
        await peer.send(b"part two")
        peer.writer.close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b"part one, part two"
        assert client.connections_in_use == 0
        assert client.connections_idle == 0  # the connection ended with the body

        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert b"".join(await read_all_chunks(response)) == b"part one, part two"
        response.release()
        assert client.connections_idle == 0
    assert server.connections == 2


async def test_204_has_no_body_and_keeps_the_connection(client: HttpClient) -> None:
    async with raw_server(replying(http_answer(status="204 No Content", headers=(), length=False))) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert response.status == 204
        assert await response.read(LIMIT) == b""
        assert client.connections_idle == 1
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read_chunk() == b""
        response.release()
    assert server.connections == 1


async def test_informational_answers_are_skipped(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        for _ in range(2):
            await peer.read_request()
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.01)  # the real answer comes in a later read
            await peer.send(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                + http_answer(b'{"ok": 1}', headers=(("X-Real", "yes"),))
            )

    async with raw_server(handler) as server:
        for _ in range(2):
            response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
            assert response.status == 200
            assert response.headers["x-real"] == "yes"
            assert "link" not in response.headers
            assert await response.read(LIMIT) == b'{"ok": 1}'
    assert server.connections == 1  # the 1xx answers did not desynchronise the connection


async def test_response_headers_are_lower_case_and_repeated_ones_joined(client: HttpClient) -> None:
    answer = http_answer(b"x", headers=(("X-Multi", "a"), ("x-multi", "b"), ("Content-Type", "text/plain")))
    async with raw_server(replying(answer)) as server:
        response = await client.post(server.url(), b"", {}, BOUNDED, private_ok=True)
        assert response.headers["x-multi"] == "a, b"
        assert response.content_type == "text/plain"
        await response.read(LIMIT)


# --- 3. keep-alive -----------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(client: HttpClient) -> None:
    async with raw_server(replying(http_answer(b'{"n": 1}'), http_answer(b'{"n": 2}'))) as server:
        response = await client.post(server.url(), b"1", {}, BOUNDED, private_ok=True)
        assert client.connections_in_use == 1
        assert client.connections_idle == 0
        assert await response.read(LIMIT) == b'{"n": 1}'
        assert client.connections_in_use == 0
        assert client.connections_idle == 1

        response = await client.post(server.url(), b"2", {}, BOUNDED, private_ok=True)
        assert client.connections_idle == 0
        assert client.connections_in_use == 1
        assert await response.read(LIMIT) == b'{"n": 2}'
        assert (client.connections_in_use, client.connections_idle) == (0, 1)
    assert server.connections == 1
    assert [r.body for r in server.requests] == [b"1", b"2"]


async def test_concurrent_requests_use_separate_connections(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        while True:
            request = await peer.read_request()
            await asyncio.sleep(0.05)
            await peer.send(http_answer(request.body))

    async with raw_server(handler) as server:

        async def call(n: int) -> bytes:
            response = await client.post(server.url(), str(n).encode(), {}, BOUNDED, private_ok=True)
            return await response.read(LIMIT)

        assert await asyncio.gather(*(call(n) for n in range(3))) == [b"0", b"1", b"2"]
        assert client.connections_idle == 3
        assert await asyncio.gather(*(call(n) for n in range(3))) == [b"0", b"1", b"2"]
    assert server.connections == 3


async def test_connection_close_answer_is_not_reused(client: HttpClient) -> None:
    answer = http_answer(b"{}", headers=(("Connection", "close"),))
    async with raw_server(replying(answer)) as server:
        for _ in range(2):
            response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
            assert await response.read(LIMIT) == b"{}"
            assert (client.connections_in_use, client.connections_idle) == (0, 0)
    assert server.connections == 2


async def test_http10_answer_is_not_reused(client: HttpClient) -> None:
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    async with raw_server(replying(answer)) as server:
        for _ in range(2):
            response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
            assert await response.read(LIMIT) == b"{}"
            assert client.connections_idle == 0
    assert server.connections == 2


async def test_server_closing_an_idle_connection_means_a_new_one(client: HttpClient) -> None:
    async def answer_once(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b'{"once": true}'))
        # Returning closes this connection, which the client holds as idle.

    async with raw_server(answer_once) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b'{"once": true}'
        await eventually(lambda: client.connections_idle == 0)  # the client noticed the close

        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b'{"once": true}'
    assert server.connections == 2


async def test_keepalive_timeout_closes_idle_connections() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"{}"))
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        async with open_client(keepalive_timeout=0.2) as http:
            await (await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)).read(LIMIT)
            assert http.connections_idle == 1
            await asyncio.wait_for(server.client_gone.wait(), 2)  # the client closed it
            assert http.connections_idle == 0

            await (await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)).read(LIMIT)
    assert server.connections == 2


async def test_connection_idle_too_long_is_not_reused_even_before_the_sweep() -> None:
    async with raw_server(replying(http_answer(b"{}"))) as server:
        async with open_client(keepalive_timeout=0.1) as http:
            await (await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)).read(LIMIT)
            assert http.connections_idle == 1
            time.sleep(0.15)  # blocks the loop: the sweeper cannot run before the next call
            await (await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)).read(LIMIT)
    assert server.connections == 2


async def test_garbage_after_the_answer_spoils_the_connection(client: HttpClient) -> None:
    async with raw_server(
        replying(http_answer(b"{}") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
    ) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b"{}"
        assert (client.connections_in_use, client.connections_idle) == (0, 0)

    async with raw_server(replying(http_answer(b"{}") + b"\x00\x01 not http")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b"{}"
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_bytes_on_an_idle_connection_close_it(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"{}"))
        await asyncio.sleep(0.05)
        await peer.send(http_answer(b"unsolicited"))  # an answer to no request
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == b"{}"
        assert client.connections_idle == 1
        await asyncio.wait_for(server.client_gone.wait(), 2)
        assert client.connections_idle == 0


# --- 4. failures ------------------------------------------------------------------------------------


async def test_connection_refused_is_connect_error(client: HttpClient) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, with no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError) as caught:
        await client.post(f"http://127.0.0.1:{port}/v1", b"{}", {}, BOUNDED, private_ok=True)
    assert isinstance(caught.value, OSError)
    assert isinstance(caught.value, HttpClientError)
    assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_unresolvable_name_is_connect_error() -> None:
    async def failing(host: str, port: int) -> list[Address]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async with open_client(resolver=SafeResolver(failing)) as http:
        with pytest.raises(ConnectError, match="cannot resolve"):
            await http.post("http://nowhere.test/v1", b"{}", {}, BOUNDED, private_ok=True)


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_disconnect_before_answering(client: HttpClient, how: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if how == "reset":
            peer.reset()
        else:
            peer.writer.close()

    async with raw_server(handler) as server:
        # Not a byte of an answer: the error says so, not "mid-answer" (which it said for all).
        with pytest.raises(ServerDisconnectedError, match="closed the connection before answering") as caught:
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert "mid-answer" not in str(caught.value)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_a_kept_alive_connection_dropped_as_it_is_reused_closed_before_answering(
    client: HttpClient,
) -> None:
    # The stale keep-alive case: the upstream answered one request, kept the connection, and
    # closes it when the next request arrives on it (its own idle timeout, a restart).
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"first"))
        await peer.read_request()
        peer.writer.close()

    async with raw_server(handler) as server:
        first = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await first.read(LIMIT) == b"first"
        assert client.connections_idle == 1
        with pytest.raises(ServerDisconnectedError, match="closed the connection before answering"):
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert server.connections == 1  # it was the reused connection, not a new one
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 20",  # part of a status line
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n",  # the head, not its end
        b"HTTP/1.1 100 Continue\r\n\r\n",  # an interim answer, then nothing
    ],
    ids=["status-line", "headers", "interim"],
)
async def test_disconnect_inside_the_head_is_mid_answer(client: HttpClient, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer)
        peer.writer.close()

    async with raw_server(handler) as server:
        with pytest.raises(ServerDisconnectedError, match="closed the connection mid-answer"):
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


@pytest.mark.parametrize(
    "answer",
    [
        http_answer(b"0123456789")[:-4],  # Content-Length 10, 6 bytes sent
        http_answer(chunked(b"abc"), headers=(("Transfer-Encoding", "chunked"),), length=False)[:-5],
    ],
    ids=["content-length", "chunked"],
)
async def test_disconnect_mid_body(client: HttpClient, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer)
        peer.writer.close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(ServerDisconnectedError, match="closed the connection mid-answer"):
            await response.read(LIMIT)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_reset_mid_body_delimited_by_close_is_an_error(client: HttpClient) -> None:
    go = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"the first half, ", length=False))
        await go.wait()
        peer.reset()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read_chunk() == b"the first half, "
        go.set()
        with pytest.raises(ServerDisconnectedError):
            await response.read_chunk()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=[
        "status-code",
        "protocol",
        "not-http",
        "header-line",
        "two-lengths",
        "negative-length",
        "length-and-chunked",
        "upgrade",
    ],
)
async def test_malformed_answer_is_invalid_response(client: HttpClient, answer: bytes) -> None:
    async with raw_server(replying(answer)) as server:
        with pytest.raises(InvalidResponseError):
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_malformed_chunk_is_invalid_response(client: HttpClient) -> None:
    answer = http_answer(b"zz\r\nabc\r\n0\r\n\r\n", headers=(("Transfer-Encoding", "chunked"),), length=False)
    async with raw_server(replying(answer)) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(InvalidResponseError):
            await response.read(LIMIT)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


@pytest.mark.parametrize("arrival", ["whole", "trickle"])
async def test_body_over_the_limit_closes_the_connection(client: HttpClient, arrival: str) -> None:
    async def handler(peer: Peer) -> None:
        while True:
            await peer.read_request()
            await peer.send(http_answer(b"x" * 2000)[:-2000])
            if arrival == "whole":
                await peer.send(b"x" * 2000)
            else:
                for _ in range(20):
                    await peer.send(b"x" * 100)
                    await asyncio.sleep(0.002)

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(BodyTooLargeError):
            await response.read(1000)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        # The next call does not inherit the rest of that body: a new connection, a whole answer.
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(4000) == b"x" * 2000
    assert server.connections == 2


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
async def test_compressed_bodies_are_decoded(client: HttpClient, encoding: str) -> None:
    plain = json.dumps({"text": "compressible " * 500}).encode()
    packed = gzip.compress(plain) if "gzip" in encoding else zlib.compress(plain)
    answer = http_answer(packed, headers=(("Content-Encoding", encoding.upper()),))
    async with raw_server(replying(answer)) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == plain
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert b"".join(await read_all_chunks(response)) == plain
        response.release()
        assert client.connections_idle == 1


async def test_aiohttp_gzip_stream_is_decoded(client: HttpClient) -> None:
    lines = [f"data: {n} {'z' * 200}\n\n".encode() for n in range(200)]

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        for line in lines:
            await response.write(packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH))
        await response.write(packer.flush())
        await response.write_eof()
        return response

    async with aiohttp_server(stream) as base:
        response = await client.post(f"{base}/v1/stream", b"{}", {}, BOUNDED, private_ok=True)
        assert b"".join(await read_all_chunks(response)) == b"".join(lines)
        response.release()


async def test_gzip_bomb_over_the_limit(client: HttpClient) -> None:
    bomb = gzip.compress(b"\0" * (32 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    async with raw_server(replying(http_answer(bomb, headers=(("Content-Encoding", "gzip"),)))) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(BodyTooLargeError):
            await response.read(LIMIT)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_corrupt_compressed_body_is_invalid_response(client: HttpClient) -> None:
    answer = http_answer(b"this is not gzip at all", headers=(("Content-Encoding", "gzip"),))
    async with raw_server(replying(answer)) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(InvalidResponseError):
            await response.read(LIMIT)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


@pytest.mark.parametrize("reader", ["read", "read_chunk"])
async def test_truncated_compressed_body_is_invalid_response(client: HttpClient, reader: str) -> None:
    packed = gzip.compress(b"hello world " * 100)
    cut = packed[: len(packed) // 2]
    async with raw_server(replying(http_answer(cut, headers=(("Content-Encoding", "gzip"),)))) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        with pytest.raises(InvalidResponseError):
            if reader == "read":
                await response.read(LIMIT)
            else:
                await read_all_chunks(response)


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip"])
async def test_unsupported_content_encoding_is_invalid_response(client: HttpClient, encoding: str) -> None:
    async with raw_server(
        replying(http_answer(b"\x0b\x02\x80{}\x03", headers=(("Content-Encoding", encoding),)))
    ) as server:
        with pytest.raises(InvalidResponseError, match="Content-Encoding"):
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_read_whole_body_larger_than_the_pause_threshold(client: HttpClient) -> None:
    body = os.urandom(1024 * 1024)
    async with raw_server(replying(http_answer(body, headers=()))) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=1.0, idle=0.5), private_ok=True)
        assert await response.read(4 * LIMIT) == body


async def test_read_whole_body_just_under_the_pause_threshold(client: HttpClient) -> None:
    body = os.urandom(200 * 1024)
    async with raw_server(replying(http_answer(body, headers=()))) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read(LIMIT) == body


# --- 5. timeouts ------------------------------------------------------------------------------------


async def test_total_timeout_before_the_answer(client: HttpClient) -> None:
    async with raw_server(then_silent()) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError) as caught:
            await client.post(server.url(), b"{}", {}, Timeout(total=0.2), private_ok=True)
        assert not isinstance(caught.value, IdleTimeoutError)
        assert loop.time() - started < 2
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)  # the server saw the connection closed


async def test_total_timeout_while_streaming(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(length=False, headers=(("Transfer-Encoding", "chunked"),)))
        while True:
            await peer.send(b"1\r\n.\r\n")
            await asyncio.sleep(0.02)

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=0.3, idle=1.0), private_ok=True)
        with pytest.raises(TimeoutError) as caught:
            await read_all_chunks(response)
        assert not isinstance(caught.value, IdleTimeoutError)
        assert client.connections_in_use == 0


async def test_idle_timeout_before_the_answer(client: HttpClient) -> None:
    async with raw_server(then_silent()) as server:
        with pytest.raises(IdleTimeoutError):
            await client.post(server.url(), b"{}", {}, Timeout(idle=0.2), private_ok=True)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_idle_timeout_while_streaming(client: HttpClient) -> None:
    head = http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False)
    async with raw_server(then_silent(head, b"5\r\nfirst\r\n")) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(idle=0.2), private_ok=True)
        assert response.status == 200
        assert await response.read_chunk() == b"first"
        with pytest.raises(IdleTimeoutError):
            await response.read_chunk()
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_idle_timeout_while_reading_whole(client: HttpClient) -> None:
    async with raw_server(then_silent(http_answer(b"0123456789")[:-5])) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=1.0, idle=0.2), private_ok=True)
        with pytest.raises(IdleTimeoutError):
            await response.read(LIMIT)


@pytest.mark.parametrize("how", ["trickled-head", "102-processing"])
async def test_idle_timer_counts_every_byte_before_the_head(client: HttpClient, how: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if how == "trickled-head":
            for byte in http_answer(b"{}", headers=(("X-Pad", "p" * 20),)):
                await peer.send(bytes([byte]))
                await asyncio.sleep(0.01)  # about 0.7 s for the whole answer, 10 ms between bytes
        else:
            for _ in range(6):
                await peer.send(b"HTTP/1.1 102 Processing\r\n\r\n")
                await asyncio.sleep(0.1)
            await peer.send(http_answer(b"{}"))
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=3, idle=0.25), private_ok=True)
        assert await response.read(LIMIT) == b"{}"


async def test_slow_but_steady_stream_is_not_idle(client: HttpClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False))
        for n in range(10):
            await asyncio.sleep(0.1)
            await peer.send(b"1\r\n%d\r\n" % n)
        await peer.send(b"0\r\n\r\n")
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(idle=0.3), private_ok=True)
        assert b"".join(await read_all_chunks(response)) == b"0123456789"
        response.release()
        assert client.connections_idle == 1


async def test_slow_reader_is_not_an_idle_upstream(client: HttpClient) -> None:
    """Bytes the caller has not read yet are progress: only a silent upstream idles out."""
    async with raw_server(replying(http_answer(b"y" * 1000, headers=()))) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(idle=0.1), private_ok=True)
        await asyncio.sleep(0.35)
        assert await response.read_chunk() == b"y" * 1000
        assert await response.read_chunk() == b""
        response.release()


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(Timeout(idle=0.2), IdleTimeoutError), (Timeout(total=0.2), TimeoutError)],
    ids=["idle", "total"],
)
async def test_timeout_while_connecting(timeout: Timeout, error: type[Exception]) -> None:
    slow = StaticLookup("127.0.0.1", delay=5)
    async with open_client(resolver=SafeResolver(slow)) as http:
        with pytest.raises(error) as caught:
            await http.post("http://slow.test/v1", b"{}", {}, timeout, private_ok=True)
        assert isinstance(caught.value, IdleTimeoutError) == (error is IdleTimeoutError)
        assert (http.connections_in_use, http.connections_idle) == (0, 0)


# --- 6. cancellation ----------------------------------------------------------------------------------


async def test_cancelling_post_closes_the_connection(client: HttpClient) -> None:
    async with raw_server(then_silent()) as server:
        task = asyncio.create_task(client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True))
        await asyncio.wait_for(server.arrived.wait(), 2)
        assert client.connections_in_use == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_cancelling_read_chunk_closes_the_connection(client: HttpClient) -> None:
    head = http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False)
    async with raw_server(then_silent(head, b"3\r\none\r\n")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read_chunk() == b"one"
        task = asyncio.create_task(response.read_chunk())
        await asyncio.sleep(0.02)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_cancelling_read_closes_the_connection(client: HttpClient) -> None:
    async with raw_server(then_silent(http_answer(b"0123456789")[:-5])) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        task = asyncio.create_task(response.read(LIMIT))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_cancelling_while_connecting_leaves_nothing_behind() -> None:
    slow = StaticLookup("127.0.0.1", delay=5)
    async with open_client(resolver=SafeResolver(slow)) as http:
        task = asyncio.create_task(http.post("http://slow.test/v1", b"{}", {}, BOUNDED, private_ok=True))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (http.connections_in_use, http.connections_idle) == (0, 0)


async def test_closing_the_response_early_stops_the_upstream(client: HttpClient) -> None:
    head = http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False)
    async with raw_server(then_silent(head, b"3\r\none\r\n")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read_chunk() == b"one"
        response.release()  # not at the end: the connection cannot be reused
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)


async def test_closed_client_refuses_and_closes_its_connections() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(b"{}"))
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        http = HttpClient()
        await (await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)).read(LIMIT)
        assert http.connections_idle == 1
        await http.close()
        await asyncio.wait_for(server.client_gone.wait(), 2)
        with pytest.raises(HttpClientError, match="closed"):
            await http.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
    assert server.connections == 1


# --- 7. security ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Authorization", f"Bearer {CANARY}\r\nX-Injected: 1"),
        ("Authorization", f"Bearer {CANARY}\nX-Injected: 1"),
        ("Authorization", f"Bearer {CANARY}\r"),
        ("X-Api-Key", f"{CANARY}\0"),
    ],
    ids=["crlf", "lf", "cr", "nul"],
)
async def test_header_value_with_line_break_is_refused_without_leaking(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with no_connection_attempt(monkeypatch), pytest.raises(InvalidHeaderError) as caught:
        await client.post("http://127.0.0.1:9/v1", b"{}", {name: value}, BOUNDED, private_ok=True)
    assert caught.value.header == name
    assert CANARY not in str(caught.value)
    assert CANARY not in repr(caught.value)
    assert all(CANARY not in str(arg) for arg in caught.value.args)


@pytest.mark.parametrize(
    "name", ["X-Bad\r\nX-Injected", "X Space", "X:Colon", "X-\u00e9", "X-Tab\t"], ids=repr
)
async def test_bad_header_name_is_refused(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    with no_connection_attempt(monkeypatch), pytest.raises(InvalidHeaderError):
        await client.post("http://127.0.0.1:9/v1", b"{}", {name: CANARY}, BOUNDED, private_ok=True)


async def test_default_header_is_checked_when_the_client_is_made() -> None:
    with pytest.raises(InvalidHeaderError) as caught:
        HttpClient(default_headers={"X-Key": f"{CANARY}\r\n"})
    assert CANARY not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{CANARY}@127.0.0.1:9/v1",
        f"https://{CANARY}@127.0.0.1/v1",
        "ftp://127.0.0.1/v1",
        "file:///etc/passwd",
        "127.0.0.1:9/v1",
        "http:///v1",
        "http://127.0.0.1:99999/v1",
        "http://127.0.0.1:port/v1",
        "http://127.0.0.1:-1/v1",
        "http://exa mple.test/v1",
        "http://ex\u00e4mple.test/v1",
        "http://[::1/v1",
    ],
)
async def test_unusable_url_is_invalid_url(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    with no_connection_attempt(monkeypatch), pytest.raises(InvalidURLError) as caught:
        await client.post(url, b"{}", {}, BOUNDED, private_ok=True)
    assert CANARY not in str(caught.value)


async def test_path_and_query_are_percent_encoded(client: HttpClient) -> None:
    async with raw_server(replying(http_answer(b"{}"))) as server:
        urls = [
            server.url("/v1/a b\r\nX-Injected: yes\r\n\r\nGET /evil HTTP/1.1"),
            server.url("/v1/%0d%0aX-Injected:%20yes"),
            server.url("/v1/caf\u00e9?q=a b&r=\r\nX-Injected: yes#fragment"),
            server.url("/v1/tab\there"),
        ]
        for url in urls:
            response = await client.post(url, b"{}", {}, BOUNDED, private_ok=True)
            assert await response.read(LIMIT) == b"{}"
    assert server.connections == 1  # every request was one well-framed exchange
    lines = [request.request_line for request in server.requests]
    assert len(lines) == len(urls)
    for request in server.requests:
        method, target, version = request.request_line.split(" ")
        assert (method, version) == ("POST", "HTTP/1.1")
        assert all(0x21 <= ord(c) < 0x7F for c in target)
        assert "#" not in target
        assert request.all("x-injected") == []
        assert [name.lower() for name, _ in request.headers] == [
            "host",
            "content-length",
            "user-agent",
            "accept-encoding",
        ]
    assert lines[0].startswith("POST /v1/a%20b")
    assert lines[1] == "POST /v1/%0d%0aX-Injected:%20yes HTTP/1.1"  # already encoded: left alone
    assert lines[2].startswith("POST /v1/caf%C3%A9?q=a%20b&r=")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.169.254:80/latest/meta-data/",
        "https://169.254.169.254/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
async def test_metadata_address_is_forbidden_without_connecting(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    lookup = StaticLookup("127.0.0.1")
    async with open_client(resolver=SafeResolver(lookup)) as http:
        with no_connection_attempt(monkeypatch), pytest.raises(ForbiddenAddressError) as caught:
            await http.post(url, b"{}", {}, BOUNDED, private_ok=True)
    assert isinstance(caught.value, OSError)
    assert lookup.calls == 0  # literal addresses and forbidden names are never looked up


@pytest.mark.parametrize("host", ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518"])
async def test_other_spellings_of_the_metadata_address_are_forbidden(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """Numeric forms the system resolver turns into 169.254.169.254 (no DNS query is involved)."""
    with no_connection_attempt(monkeypatch), pytest.raises(ForbiddenAddressError):
        await client.post(f"http://{host}/latest/meta-data/", b"{}", {}, BOUNDED, private_ok=True)


async def test_name_resolving_to_metadata_is_forbidden_without_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rebinding = StaticLookup("169.254.169.254", "fe80::1")
    async with open_client(resolver=SafeResolver(rebinding)) as http:
        with no_connection_attempt(monkeypatch), pytest.raises(ForbiddenAddressError):
            await http.post("http://looks-fine.test/v1", b"{}", {}, BOUNDED, private_ok=True)
        assert (http.connections_in_use, http.connections_idle) == (0, 0)
    assert rebinding.calls == 1


async def test_forbidden_addresses_are_dropped_and_the_rest_used() -> None:
    async with raw_server(replying(http_answer(b"{}"))) as server:
        mixed = StaticLookup("169.254.169.254", "127.0.0.1")
        async with open_client(resolver=SafeResolver(mixed)) as http:
            response = await http.post(
                f"http://mixed.test:{server.port}/v1", b"{}", {}, BOUNDED, private_ok=True
            )
            assert await response.read(LIMIT) == b"{}"
    assert server.connections == 1


# --- 8. TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(Path(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def server_tls(certs: CertFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    return context


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_https_with_a_trusted_ca(certs: CertFiles, server_tls: ssl.SSLContext, host: str) -> None:
    async with raw_server(replying(http_answer(b'{"tls": true}')), ssl_context=server_tls) as server:
        trusting = ssl.create_default_context(cafile=str(certs.ca_cert))
        resolver = SafeResolver(StaticLookup("127.0.0.1"))
        async with open_client(ssl_context=trusting, resolver=resolver) as http:
            for _ in range(2):
                response = await http.post(
                    server.url(scheme="https", host=host), b"{}", {}, BOUNDED, private_ok=True
                )
                assert await response.read(LIMIT) == b'{"tls": true}'
            assert http.connections_idle == 1
    assert server.connections == 1  # kept alive over TLS too
    assert server.requests[0].header("host") == f"{host}:{server.port}"


async def test_https_with_an_untrusted_certificate_is_connect_error(server_tls: ssl.SSLContext) -> None:
    async with raw_server(replying(http_answer(b"{}")), ssl_context=server_tls) as server:
        async with open_client() as http:  # the default context: the test CA is not trusted
            with pytest.raises(ConnectError, match="(?i)certificate"):
                await http.post(server.url(scheme="https"), b"{}", {}, BOUNDED, private_ok=True)
            assert (http.connections_in_use, http.connections_idle) == (0, 0)
    assert server.requests == []


async def test_https_with_the_wrong_host_name_is_connect_error(
    certs: CertFiles, server_tls: ssl.SSLContext
) -> None:
    async with raw_server(replying(http_answer(b"{}")), ssl_context=server_tls) as server:
        trusting = ssl.create_default_context(cafile=str(certs.ca_cert))
        resolver = SafeResolver(StaticLookup("127.0.0.1"))
        async with open_client(ssl_context=trusting, resolver=resolver) as http:
            with pytest.raises(ConnectError):
                await http.post(
                    f"https://impostor.test:{server.port}/v1", b"{}", {}, BOUNDED, private_ok=True
                )
    assert server.requests == []


async def test_plain_http_to_a_tls_server_fails_cleanly(
    client: HttpClient, server_tls: ssl.SSLContext
) -> None:
    async with raw_server(replying(http_answer(b"{}")), ssl_context=server_tls) as server:
        with pytest.raises(HttpClientError):
            await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


# --- 9. backpressure --------------------------------------------------------------------------------


async def test_large_stream_read_slowly_arrives_intact(client: HttpClient) -> None:
    body = os.urandom(8 * 1024 * 1024)
    piece = 64 * 1024

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            http_answer(headers=(("Content-Type", "application/octet-stream"),), length=False)[:-2]
        )
        await peer.send(f"Content-Length: {len(body)}\r\n\r\n".encode())
        for offset in range(0, len(body), piece):
            await peer.send(body[offset : offset + piece])
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=30, idle=5), private_ok=True)
        digest = hashlib.sha256()
        received = 0
        most_buffered = 0
        while chunk := await response.read_chunk():
            digest.update(chunk)
            received += len(chunk)
            await asyncio.sleep(0.003)  # a slow consumer
            most_buffered = max(most_buffered, response._buffered)  # noqa: SLF001 - the point of the test
        response.release()
        assert received == len(body)
        assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
        assert most_buffered <= 1024 * 1024  # reading paused: the 8 MB never piled up in memory
        assert client.connections_idle == 1


async def test_aiohttp_large_stream_arrives_intact(client: HttpClient) -> None:
    body = os.urandom(8 * 1024 * 1024)

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for offset in range(0, len(body), 100_000):
            await response.write(body[offset : offset + 100_000])
        await response.write_eof()
        return response

    async with aiohttp_server(stream) as base:
        response = await client.post(f"{base}/v1/blob", b"{}", {}, Timeout(total=30, idle=5), private_ok=True)
        digest = hashlib.sha256()
        while chunk := await response.read_chunk():
            digest.update(chunk)
        response.release()
        assert digest.hexdigest() == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("name", ["Content-Length", "host", "Transfer-Encoding", "CONNECTION"])
async def test_a_caller_cannot_set_framing_headers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_client() as http:
        with no_connection_attempt(monkeypatch), pytest.raises(InvalidHeaderError):
            await http.post("http://127.0.0.1:9/v1", b"{}", {name: "5"}, BOUNDED, private_ok=True)


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "a\x1bb"])
async def test_control_characters_in_values_are_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_client() as http:
        with no_connection_attempt(monkeypatch), pytest.raises(InvalidHeaderError):
            await http.post("http://127.0.0.1:9/v1", b"{}", {"X-Thing": value}, BOUNDED, private_ok=True)


async def test_a_caller_header_replaces_a_default_whatever_its_case() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_client() as http:
            response = await http.post(
                f"http://127.0.0.1:{port}/v1",
                b"{}",
                {"user-agent": "agent/2", "X-A": "1"},
                BOUNDED,
                private_ok=True,
            )
            assert await response.read(100) == b"ok"
    finally:
        server.close()
        await server.wait_closed()
    head = seen[0].lower()
    assert head.count(b"user-agent:") == 1 and b"user-agent: agent/2" in head
    assert head.count(b"content-length:") == 1


async def test_oversized_response_headers_are_refused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(2000):  # ~100 KB of headers, never ending in a body
            writer.write(f"X-Filler-{i}: {'x' * 40}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(5)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_client() as http:
            with pytest.raises(InvalidResponseError, match="over 100 headers"):
                await http.post(f"http://127.0.0.1:{port}/v1", b"{}", {}, BOUNDED, private_ok=True)
            assert http.connections_in_use == 0
    finally:
        server.close()
        await server.wait_closed()


# --- review fixes: shutdown, closed responses, dual-stack hosts, bad names ------------------------


async def test_closing_the_client_fails_an_answer_being_read() -> None:
    async with raw_server(then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")) as server:
        http = HttpClient()
        response = await http.post(server.url(), b"{}", {}, Timeout(total=30.0, idle=30.0), private_ok=True)
        reader = asyncio.ensure_future(response.read(LIMIT))
        await asyncio.sleep(0)  # let the reader start waiting for the rest of the body
        await http.close()
        async with asyncio.timeout(2):  # promptly, not at a timer
            with pytest.raises(ServerDisconnectedError):
                await reader
        assert http.connections_in_use == 0


async def test_reading_a_closed_response_fails_instead_of_waiting(client: HttpClient) -> None:
    async with raw_server(then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        response.close()
        async with asyncio.timeout(2):
            with pytest.raises(ServerDisconnectedError):
                await response.read_chunk()
        assert client.connections_in_use == 0


async def test_an_address_that_never_answers_costs_a_quarter_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # A dual-stack name whose first address drops packets (a broken IPv6 route, say).
    async with raw_server(replying(http_answer(b"ok"))) as server:
        lookup = StaticLookup("192.0.2.1", "127.0.0.1")  # TEST-NET-1 first: made to hang below
        loop = asyncio.get_running_loop()
        real = loop.create_connection
        late: list[Any] = []

        async def hang_for_test_net(factory: Any, host: str, *args: Any, **kwargs: Any) -> Any:
            if host == "192.0.2.1":
                await asyncio.sleep(30)
            late.append(host)
            return await real(factory, host, *args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", hang_for_test_net)
        async with open_client(resolver=SafeResolver(lookup)) as http:
            # Without staggered attempts the first address would hold the request for the whole
            # 10 s budget; with them the second answers long before the 5 s bound.
            async with asyncio.timeout(5):
                response = await http.post(
                    f"http://dual.example:{server.port}/v1", b"{}", {}, Timeout(total=10.0), private_ok=True
                )
                assert await response.read(LIMIT) == b"ok"
            assert late == ["127.0.0.1"]
            assert http.connections_in_use == 0 and http.connections_idle == 1


async def test_first_address_refusing_moves_on_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with raw_server(replying(http_answer(b"ok"))) as server:
        refused = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        refused_port = refused.sockets[0].getsockname()[1]
        refused.close()
        await refused.wait_closed()
        loop = asyncio.get_running_loop()
        real = loop.create_connection

        async def first_refuses(factory: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            if host == "127.0.0.2":
                port = refused_port  # nothing listens there any more: ECONNREFUSED
            return await real(factory, host, port, *args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", first_refuses)
        # A failed attempt starts the next one at once: with a 30 s attempt delay, only that
        # finishes inside the 5 s bound.
        monkeypatch.setattr("server.providers.http.HAPPY_EYEBALLS_DELAY", 30.0)
        async with open_client(resolver=SafeResolver(StaticLookup("127.0.0.2", "127.0.0.1"))) as http:
            async with asyncio.timeout(5):
                response = await http.post(
                    f"http://dual.example:{server.port}/v1", b"{}", {}, BOUNDED, private_ok=True
                )
                assert await response.read(LIMIT) == b"ok"


async def test_every_address_failing_is_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    async with open_client(resolver=SafeResolver(StaticLookup("127.0.0.1", "127.0.0.1"))) as http:
        with pytest.raises(ConnectError, match="cannot connect"):
            await http.post(f"http://dual.example:{port}/v1", b"{}", {}, BOUNDED, private_ok=True)
        assert http.connections_in_use == 0


async def test_a_host_name_the_idna_codec_refuses_is_connect_error(client: HttpClient) -> None:
    with pytest.raises(ConnectError):
        await client.post(f"http://{'a' * 70}.example/v1", b"{}", {}, BOUNDED, private_ok=True)


# --- read_chunk waiting on its own future (one per chunk of a paced stream) ---------------------


def _paced_chunks(*pieces: bytes, gap: float, end: bytes | None) -> Handler:
    """A chunked answer whose pieces come `gap` apart (each read finds nothing and waits), then
    `end` (the last chunk, a piece cut short, ...) and the connection closed; None: silent."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False))
        for piece in pieces:
            await asyncio.sleep(gap)
            await peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        await asyncio.sleep(gap)
        if end is None:
            await peer.wait_client_close()
            return
        await peer.send(end)
        peer.writer.close()

    return handler


async def test_paced_chunks_each_waited_for_then_the_connection_is_reused(client: HttpClient) -> None:
    pieces = [b"a", b"bb", b"ccc", b"dddd"]
    async with raw_server(_paced_chunks(*pieces, gap=0.03, end=b"0\r\n\r\n")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        got = []
        while chunk := await response.read_chunk():
            got.append(chunk)
            assert response._waiter is None  # noqa: SLF001 - no waiter left between reads
        assert got == pieces
        response.release()
        assert (client.connections_in_use, client.connections_idle) == (0, 1)


async def test_the_upstream_closing_mid_chunk_while_a_read_waits_is_an_error(client: HttpClient) -> None:
    async with raw_server(_paced_chunks(b"first", gap=0.05, end=b"9\r\nonly")) as server:
        response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
        assert await response.read_chunk() == b"first"
        with pytest.raises(HttpClientError):
            while await response.read_chunk() != b"":  # "only" may come first; never a clean end
                pass
        response.release()
        assert (client.connections_in_use, client.connections_idle) == (0, 0)


async def test_the_deadline_passing_while_a_read_waits_closes_the_connection(client: HttpClient) -> None:
    async with raw_server(_paced_chunks(b"a", b"b", gap=0.05, end=None)) as server:
        response = await client.post(server.url(), b"{}", {}, Timeout(total=0.3, idle=3.0), private_ok=True)
        got = []
        with pytest.raises(TimeoutError) as caught:
            while chunk := await response.read_chunk():
                got.append(chunk)
        assert not isinstance(caught.value, IdleTimeoutError)
        assert got == [b"a", b"b"]
        assert response._waiter is None  # noqa: SLF001
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        await asyncio.wait_for(server.client_gone.wait(), 2)
