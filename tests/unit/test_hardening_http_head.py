"""Issue 12 item 13: an upstream cannot make the HTTP client buffer or wait without bound before
(or around) the body: one endless header line, an endless status line, too many headers, 1xx
answers without end, endless trailers or chunk-size lines, and a head trickled byte by byte.

Raw loopback servers send the exact bytes; every wait in a test is bounded so a regression fails
instead of hanging, and no test asserts a duration.
"""

from __future__ import annotations

import asyncio

import pytest

from server.config import RetrySettings
from server.core.retry import Deadline
from server.errors import GatewayError
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient, IdleTimeoutError, InvalidResponseError, Timeout
from server.providers.http_connection import MAX_HEAD_BYTES, MAX_HEADERS
from server.providers.openai_compat import CallOptions, open_stream, post_json
from tests.unit.test_http_client import Peer, RawServer, raw_server

# The total stays far above what any answer here needs: the client must fail on its own rule.
GENEROUS = Timeout(total=30.0)
PIECE = 64 * 1024


async def endless(peer: Peer, head: bytes, filler: bytes, *, total: int = 8 * 1024 * 1024) -> None:
    """Send `head`, then `filler` until `total` bytes or the client hangs up; then stay silent."""
    await peer.read_request()
    try:
        await peer.send(head)
        sent = 0
        while sent < total:
            await peer.send(filler * (PIECE // len(filler)))
            sent += PIECE
        await asyncio.sleep(60)  # an old client would wait here for its deadline
    except (ConnectionError, OSError):
        peer.server.client_gone.set()


async def fails_with(server: RawServer, error: type[Exception], timeout: Timeout = GENEROUS) -> Exception:
    client = HttpClient()
    try:
        async with asyncio.timeout(20):  # a bound against hanging, not a measurement
            with pytest.raises(error) as raised:
                response = await client.post(server.url(), b"{}", {}, timeout, private_ok=True)
                await response.read(1 << 20)
        assert (client.connections_in_use, client.connections_idle) == (0, 0)
        return raised.value
    finally:
        await client.close()


async def test_one_endless_header_line_is_cut_at_the_head_limit() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long: ", b"a")

    async with raw_server(handler) as server:
        error = await fails_with(server, InvalidResponseError)
        assert str(MAX_HEAD_BYTES) in str(error)
        async with asyncio.timeout(10):
            await server.client_gone.wait()  # the client hung up instead of reading on


async def test_one_endless_header_name_is_cut_at_the_head_limit() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 OK\r\nX-", b"b")

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def test_an_endless_status_line_is_cut_at_the_head_limit() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 ", b"O")

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def test_a_header_line_over_the_line_limit_is_refused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"c" * (MAX_HEAD_BYTES - 200) + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        await asyncio.sleep(60)

    async with raw_server(handler) as server:
        error = await fails_with(server, InvalidResponseError)
        assert "header line" in str(error)


async def test_too_many_headers_are_refused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        lines = b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_HEADERS + 1))
        await peer.send(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\n{}")
        await asyncio.sleep(60)

    async with raw_server(handler) as server:
        error = await fails_with(server, InvalidResponseError)
        assert str(MAX_HEADERS) in str(error)


async def test_informational_answers_without_end_are_refused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        for _ in range(1000):
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        await asyncio.sleep(60)

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def test_endless_trailers_are_cut() -> None:
    async def handler(peer: Peer) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: "
        await endless(peer, head, b"t")

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def test_an_endless_chunk_size_line_is_cut() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0")

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def test_an_endless_chunk_extension_is_cut() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=", b"e")

    async with raw_server(handler) as server:
        await fails_with(server, InvalidResponseError)


async def trickle(peer: Peer) -> None:
    """A head that never ends, one header every 50 ms: always alive, never done."""
    await peer.read_request()
    try:
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for n in range(2000):
            await peer.send(b"X-%d: 1\r\n" % n)
            await asyncio.sleep(0.05)
    except (ConnectionError, OSError):
        peer.server.client_gone.set()


async def test_a_trickled_head_is_bounded_by_the_idle_timeout() -> None:
    # A stream's timeout without a deadline: no total, an idle bound. Every header keeps the idle
    # clock alive, but the whole head must be complete within the idle bound from the request.
    async with raw_server(trickle) as server:
        await fails_with(server, IdleTimeoutError, Timeout(total=None, idle=0.5))
        async with asyncio.timeout(10):
            await server.client_gone.wait()


async def test_a_trickled_head_of_a_stream_maps_to_upstream_unavailable_and_is_not_retried() -> None:
    async with raw_server(trickle) as server:
        client = HttpClient()
        options = CallOptions(
            deadline=Deadline.after(None),
            retry=RetrySettings(initial_delay=0.0, max_attempts=3),
            default_timeout=0.5,
            scrub=lambda text: text,
        )
        target = UpstreamTarget(server.url(path="/v1"), {}, "openai", private_ok=True)
        try:
            async with asyncio.timeout(20):
                with pytest.raises(GatewayError) as raised:
                    await open_stream(client, target, server.url(), b"{}", options)
        finally:
            await client.close()
        assert raised.value.reason == "UPSTREAM_UNAVAILABLE"
        assert len(server.requests) == 1


async def test_an_endless_header_maps_to_an_upstream_error_with_error_info() -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, b"HTTP/1.1 200 OK\r\nX-Long: ", b"a")

    async with raw_server(handler) as server:
        client = HttpClient()
        options = CallOptions(
            deadline=Deadline.after(20),
            retry=RetrySettings(initial_delay=0.0, max_attempts=1),
            default_timeout=20,
            scrub=lambda text: text,
        )
        target = UpstreamTarget(server.url(path="/v1"), {}, "openai", private_ok=True)
        try:
            async with asyncio.timeout(20):
                with pytest.raises(GatewayError) as raised:
                    await post_json(client, target, server.url(), b"{}", options)
        finally:
            await client.close()
        assert raised.value.reason in ("UPSTREAM_BAD_RESPONSE", "UPSTREAM_UNAVAILABLE")
        assert raised.value.metadata["provider"] == "openai"
        assert len(raised.value.message) < 500


async def test_a_head_within_the_limits_still_works() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        headers = b"".join(b"X-%d: %s\r\n" % (n, b"v" * 100) for n in range(MAX_HEADERS - 10))
        body = b"x" * 300_000  # arrives in the same reads as the head: not counted as head
        await peer.send(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
            + headers
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )

    async with raw_server(handler) as server:
        client = HttpClient()
        try:
            response = await client.post(server.url(), b"{}", {}, GENEROUS, private_ok=True)
            assert response.status == 200
            assert await response.read(1 << 20) == b"x" * 300_000
        finally:
            await client.close()


async def test_chunked_bodies_of_tiny_chunks_with_trailers_still_work() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        chunks = b"".join(b"1;e=1\r\n%c\r\n" % (97 + n % 26) for n in range(100_000))
        await peer.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-T: 1\r\n\r\n"
        )

    async with raw_server(handler) as server:
        client = HttpClient()
        try:
            response = await client.post(server.url(), b"{}", {}, GENEROUS, private_ok=True)
            body = await response.read(1 << 20)
            assert len(body) == 100_000 and body[:3] == b"abc"
        finally:
            await client.close()


async def test_bytes_after_a_whole_answer_in_one_long_read_spoil_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        body = b"y" * (2 * MAX_HEAD_BYTES)  # head + body + garbage arrive in one read
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + b"HTTP/1.1 200 OK\r\n"
        )
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        client = HttpClient()
        try:
            response = await client.post(server.url(), b"{}", {}, GENEROUS, private_ok=True)
            assert await response.read(1 << 20) == b"y" * (2 * MAX_HEAD_BYTES)
            assert client.connections_idle == 0  # closed, not pooled with a stray answer in it
        finally:
            await client.close()
