"""A failed upstream answer is freed by reference counting, not left for the cyclic collector.

A Response keeps the error that ended it (a deadline, an idle timeout, a reset) and raises it
again to every later read. Raised as is, the stored error took the traceback of the frames it
went through, and those hold the Response (and the whole call above it: its grpc context, the
request): Response -> error -> traceback -> frame -> Response, a cycle per failed call that only
a collection frees (found with gc.DEBUG_SAVEALL around DEADLINE_EXCEEDED calls: ~100 objects
each). These run with the collector off: a weak reference to an object in the caller's frame
(which the error's traceback holds) says whether anything but a cycle keeps the call alive.
"""

from __future__ import annotations

import asyncio
import weakref

from server.providers.http import HttpClient, IdleTimeoutError, Response, Timeout
from tests.gc_helpers import collector_off
from tests.unit.test_http_client import http_answer, raw_server, then_silent


class _CallState:
    """Stands for what a failed call's frames hold (its grpc context, the request)."""


async def _post_until_timeout(client: HttpClient, url: str) -> weakref.ref[_CallState]:
    state = _CallState()  # in this frame, which the error's traceback holds
    try:
        await client.post(url, b"{}", {}, Timeout(total=0.1), private_ok=True)
    except TimeoutError:
        return weakref.ref(state)
    raise AssertionError("the post did not time out")


async def _read_until_idle_timeout(response: Response) -> weakref.ref[_CallState]:
    state = _CallState()
    try:
        await response.read_chunk()
    except IdleTimeoutError:
        return weakref.ref(state)
    raise AssertionError("the read did not time out")


async def test_a_deadline_before_the_answer_leaves_no_cycle() -> None:
    client = HttpClient()
    try:
        async with raw_server(then_silent()) as server:
            with collector_off():
                state = await _post_until_timeout(client, server.url())
                await asyncio.sleep(0)
                assert state() is None, "the timed-out call is kept by a cycle through its error"
    finally:
        await client.close()


async def test_an_idle_timeout_mid_body_leaves_no_cycle() -> None:
    head = http_answer(headers=(("Transfer-Encoding", "chunked"),), length=False)
    client = HttpClient()
    try:
        async with raw_server(then_silent(head, b"5\r\nfirst\r\n")) as server:
            with collector_off():
                response = await client.post(server.url(), b"{}", {}, Timeout(idle=0.1), private_ok=True)
                assert await response.read_chunk() == b"first"
                state = await _read_until_idle_timeout(response)
                del response
                await asyncio.sleep(0)
                assert state() is None, "the failed call is kept by a cycle through its error"
    finally:
        await client.close()
