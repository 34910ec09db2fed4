"""A finished call is freed by reference counting alone, not left for the cyclic collector.

server/inflight.py puts each call in its task's context (`_CURRENT`) and the call held its task:
task -> context -> InFlightCall -> task, a cycle that kept the call, its grpc context and RPC
state alive until a collection found it (issue 20: full collections paused the loop 17-38 ms
with 500 streams held). `_leave` breaks it. These run with the collector off: a call still
reachable through the cycle stays alive, and a weak reference to its task says so.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Any

from server.errors import GatewayError
from server.inflight import InFlight, current_call
from tests.gc_helpers import collector_off


class _Context:
    def time_remaining(self) -> float | None:
        return None


async def _abort(context: Any, error: GatewayError) -> None:
    raise AssertionError(f"not aborted in these tests: {error}")


async def test_a_finished_unary_call_and_its_task_are_freed_at_once() -> None:
    calls = InFlight(_abort)

    async def behaviour(data: bytes, context: Any) -> str:
        assert current_call() is not None
        return "answer"

    handler = calls.unary(behaviour)
    with collector_off():
        task = asyncio.ensure_future(handler(b"", _Context()))
        assert await task == "answer"
        task_ref = weakref.ref(task)
        del task
        await asyncio.sleep(0)  # the loop's own references to the finished task go
        # The task (and with it its context, the call, its grpc context) is gone without a
        # collection: nothing but a reference cycle could keep it.
        assert task_ref() is None, "the finished call's task is kept alive by a reference cycle"
    assert len(calls) == 0


async def test_a_finished_stream_and_its_task_are_freed_at_once() -> None:
    calls = InFlight(_abort)

    async def behaviour(data: bytes, context: Any) -> AsyncIterator[str]:
        assert current_call() is not None
        for piece in ("a", "b"):
            yield piece

    handler = calls.stream(behaviour)

    async def consume() -> list[str]:
        return [piece async for piece in handler(b"", _Context())]

    with collector_off():
        task = asyncio.ensure_future(consume())
        assert await task == ["a", "b"]
        task_ref = weakref.ref(task)
        del task
        await asyncio.sleep(0)
        # The task (and with it its context, the call, its grpc context) is gone without a
        # collection: nothing but a reference cycle could keep it.
        assert task_ref() is None, "the finished call's task is kept alive by a reference cycle"
    assert len(calls) == 0


async def test_a_call_cut_by_shutdown_still_has_its_task_until_it_leaves() -> None:
    # The cut cancels the task it holds: breaking the cycle must wait until the call leaves.
    calls = InFlight(_abort)
    started = asyncio.Event()

    async def behaviour(data: bytes, context: Any) -> str:
        call = current_call()
        assert call is not None and call.task is asyncio.current_task()
        started.set()
        await asyncio.sleep(30)
        return "never"

    task = asyncio.ensure_future(calls.unary(behaviour)(b"", _Context()))
    await started.wait()
    (call,) = calls._calls
    assert call.task is task
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert call.task is None
