"""Adversarial review of the call path's fast paths (session 21): each test failed before its fix.

- A kept-alive connection's llhttp parser is reused only while llhttp is at a message's start:
  a trailer saying `Connection: close` leaves it refusing any next answer, so the next request
  on that connection gets a parser of its own, as every request did before the reuse.
"""

from __future__ import annotations

from server.providers.http import HttpClient
from tests.unit.test_http_client import BOUNDED, LIMIT, Peer, chunked, http_answer, raw_server


async def test_a_trailer_saying_close_does_not_break_the_next_answer_on_the_connection() -> None:
    # RFC 9110 forbids Connection in a trailer and a recipient ignores it: the connection was
    # kept alive by its head, and the next answer on it is read as on a connection of its own.
    first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        b'{"n": 1}', trailer=b"Connection: close\r\n"
    )
    answers = [first, http_answer(b'{"n": 2}')]

    async def handler(peer: Peer) -> None:
        for answer in answers:
            await peer.read_request()
            await peer.send(answer)
        await peer.wait_client_close()

    async with raw_server(handler) as server:
        client = HttpClient()
        try:
            bodies = []
            for _ in answers:
                response = await client.post(server.url(), b"{}", {}, BOUNDED, private_ok=True)
                bodies.append(await response.read(LIMIT))
        finally:
            await client.close()
    assert bodies == [b'{"n": 1}', b'{"n": 2}']
    assert server.connections == 1  # as before the reuse: the head kept the connection alive
