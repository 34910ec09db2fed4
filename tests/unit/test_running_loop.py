"""Objects that remember the running loop (to spare asyncio.get_running_loop()'s getpid() call)
still use the loop running them when they outlive one: an HttpClient or InFlight used by one
loop, then by another while the first is stopped but not closed.

With the loop kept until it was closed, the HttpClient handed the second loop's caller a future
of the first ("got Future attached to a different loop"), and InFlight recorded no task for the
call (current_task(first_loop) is None), so a shutdown cut could not cancel it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from server.errors import GatewayError
from server.inflight import InFlight, current_call
from server.providers.http import HttpClient, Timeout
from server.running_loop import RunningLoop
from tests.unit.test_http_client import aiohttp_server


@contextmanager
def stopped_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that ran and stopped, left open while another one runs."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


async def _post_once(http: HttpClient) -> int:
    async def answer(request: web.Request) -> web.Response:
        response = web.json_response({})
        response.force_close()  # no pooled connection (bound to its loop) carries over
        return response

    async with aiohttp_server(answer) as base:
        response = await http.post(f"{base}/", b"{}", {}, Timeout(total=5.0), private_ok=True)
        await response.read(1 << 16)
        status = response.status
        assert status is not None
        return status


def test_an_http_client_used_by_a_second_loop_uses_that_loop() -> None:
    http = HttpClient()
    with stopped_loop() as first:
        assert first.run_until_complete(_post_once(http)) == 200
        assert asyncio.run(asyncio.wait_for(_post_once(http), 10)) == 200
        assert (http.connections_idle, http.connections_in_use) == (0, 0)
        first.run_until_complete(http.close())


async def _abort(context: Any, error: GatewayError) -> None:
    raise AssertionError(f"not aborted here: {error}")


class _Context:
    def time_remaining(self) -> float | None:
        return None


def test_in_flight_used_by_a_second_loop_records_that_loop_s_task() -> None:
    calls = InFlight(_abort)

    async def behaviour(data: bytes, context: Any) -> bool:
        call = current_call()
        # The task shutdown's cut cancels: None would leave the call running past the grace period.
        return call is not None and call.task is asyncio.current_task()

    handler = calls.unary(behaviour)
    with stopped_loop() as first:
        assert first.run_until_complete(handler(b"", _Context()))
        assert asyncio.run(handler(b"", _Context())), "the second loop's call has no task to cut"


def test_running_loop_is_the_loop_running_now() -> None:
    remembered = RunningLoop()

    async def lookup() -> bool:
        return remembered.get() is asyncio.get_running_loop()

    with stopped_loop() as first:
        assert first.run_until_complete(lookup())
        assert asyncio.run(lookup())
        assert first.run_until_complete(lookup())
