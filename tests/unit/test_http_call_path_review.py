"""Adversarial review of the call path's fast paths (session 21): each test failed before its fix.

- A kept-alive connection's llhttp parser is reused only while llhttp is at a message's start:
  a trailer saying `Connection: close` leaves it refusing any next answer, so the next request
  on that connection gets a parser of its own, as every request did before the reuse.
- `DeadlineTimer`: a fire costs by what is due, not by everything pending (an upstream outage
  leaves thousands of responses waiting, each deadline its own fire); what it keeps of
  responses that finished is bounded by those still pending.
- `FixedHeaders` cannot be changed once a client cached its lines (the fast path would send the
  old ones while the general path, `{**fixed.headers, **own}`, sent the new).
"""

from __future__ import annotations

import random

import pytest

from server.providers.http import FixedHeaders, HttpClient, _header_block
from server.providers.http_connection import DeadlineTimer
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


class Counted(float):
    """A deadline that counts how often it is compared (the work a fire does per response)."""

    compared = 0

    def _count(self) -> None:
        Counted.compared += 1

    def __lt__(self, other: object) -> bool:
        self._count()
        return float.__lt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:
        self._count()
        return float.__le__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        self._count()
        return float.__gt__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:
        self._count()
        return float.__ge__(self, other)  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        self._count()
        return float.__eq__(self, other)

    __hash__ = float.__hash__


class FakeLoop:
    """A loop clock and timers that never run by themselves: the test calls `_fire`."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: object) -> FakeHandle:
        return FakeHandle()


class FakeHandle:
    def cancel(self) -> None:
        pass


class Watched:
    def __init__(self, failed: list[Watched]) -> None:
        self.failed = failed

    def _deadline_passed(self) -> None:
        self.failed.append(self)


def test_a_fire_costs_by_what_is_due_not_by_everything_pending() -> None:
    loop = FakeLoop()
    timer = DeadlineTimer(loop)  # type: ignore[arg-type]
    failed: list[Watched] = []
    waiting = [Watched(failed) for _ in range(5000)]  # hung upstream calls, far from their deadline
    for n, response in enumerate(waiting):
        timer.add(response, Counted(1000.0 + n))  # type: ignore[arg-type]
    short = [Watched(failed) for _ in range(50)]
    for n, response in enumerate(short):
        timer.add(response, Counted(1.0 + n))  # type: ignore[arg-type]
    Counted.compared = 0
    for n, response in enumerate(short):  # each deadline its own fire, as under an outage
        loop.now = 1.0 + n
        timer._fire()
        assert failed[-1] is response
    assert len(failed) == len(short)
    # A heap's pop is a few dozen comparisons; a scan of every pending deadline is 5000 a fire.
    assert Counted.compared < 100 * len(short)
    loop.now = 1000.0
    timer._fire()
    assert failed[-1] is waiting[0] and len(failed) == len(short) + 1
    timer.close()


def test_what_the_timer_keeps_of_finished_responses_is_bounded_by_those_pending() -> None:
    loop = FakeLoop()
    timer = DeadlineTimer(loop)  # type: ignore[arg-type]
    failed: list[Watched] = []
    kept = [Watched(failed) for _ in range(10)]
    for response in kept:
        timer.add(response, 500.0)  # type: ignore[arg-type]
    for n in range(10_000):  # answers in time, long before their deadlines
        response = Watched(failed)
        timer.add(response, 600.0 + n)  # type: ignore[arg-type]
        timer.discard(response)  # type: ignore[arg-type]
        assert len(timer._heap) <= 2 * len(timer._pending) + 64
    loop.now = 500.0
    timer._fire()
    assert failed == kept and timer._pending == {}
    for n in range(100):  # nothing pending: nothing of a finished one kept
        response = Watched(failed)
        timer.add(response, 700.0 + n)  # type: ignore[arg-type]
        timer.discard(response)  # type: ignore[arg-type]
    assert timer._heap == []


def test_fixed_headers_cannot_change_under_a_clients_cached_lines() -> None:
    client = HttpClient()
    fixed = FixedHeaders({"Accept": "application/json"})
    own = {"Authorization": "Bearer k"}
    sent = client._block_after_fixed(fixed, own, 2)
    with pytest.raises(TypeError):
        fixed.headers["Accept"] = "text/event-stream"  # type: ignore[index]
    assert client._block_after_fixed(fixed, own, 2) == sent
    assert sent == _header_block(client._default_headers, {**fixed.headers, **own}, 2)


def test_the_heap_fails_exactly_what_a_timer_per_response_would_in_any_order() -> None:
    rng = random.Random(2126)
    for _ in range(20):
        loop = FakeLoop()
        timer = DeadlineTimer(loop)  # type: ignore[arg-type]
        failed: list[Watched] = []
        deadlines: dict[Watched, float] = {}  # the model: what is pending, and until when
        for _ in range(400):
            step = rng.random()
            if step < 0.5:
                response = Watched(failed)
                deadline = loop.now + rng.choice([0.0, 0.5, 1.0, rng.uniform(0.0, 20.0)])
                timer.add(response, deadline)  # type: ignore[arg-type]
                deadlines[response] = deadline
            elif step < 0.8 and deadlines:
                response = rng.choice(list(deadlines))
                timer.discard(response)  # type: ignore[arg-type]
                del deadlines[response]
            elif timer._timer is not None:
                # The loop runs the timer at its time, a little early, or late (a busy loop).
                loop.now = max(loop.now, timer._armed_at + rng.choice([-0.0005, 0.0, 0.3]))
                due = max(loop.now, timer._armed_at)
                expected = {response for response, deadline in deadlines.items() if deadline <= due}
                failed.clear()
                timer._fire()
                assert set(failed) == expected and len(failed) == len(expected)
                for response in expected:
                    del deadlines[response]
            assert timer._pending == deadlines
            if deadlines:  # armed no later than the earliest deadline left
                assert timer._timer is not None and timer._armed_at <= min(deadlines.values())
            assert len(timer._heap) <= 2 * len(deadlines) + 64 + 1
