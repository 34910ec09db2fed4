"""The first event of a routed stream's attempt, within the deployment's `timeout_seconds`.

`timeout_seconds` is there to leave a slow or hung deployment while a fallback is still
possible, i.e. until the first event reaches the caller; an answer already flowing is never cut
by it (it could not fall back any more, and would be lost). So for a stream it is a timer on the
first `anext`, not the upstream call's deadline, which stays the caller's.

On expiry the attempt is marked timed out, then its task cancelled (as `asyncio.timeout` does,
but marked first): the attempt unwinds as for any cancellation (the upstream connection is
closed), its trace records the timeout instead of a caller's cancellation (`Attempt.outcome`),
and the timeout is raised here for the router to fall back on. A cancellation that is not ours
(the caller, shutdown) goes on as it came.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from server.routing.attempts import Attempt

T = TypeVar("T")


async def first_event(events: AsyncIterator[T], attempt: Attempt) -> T:
    at = attempt.timeout_at
    if at is None:
        return await anext(events)
    task = asyncio.current_task()
    assert task is not None

    def expire() -> None:
        attempt.timed_out = attempt.timeout_error()
        task.cancel()

    handle = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), expire)
    try:
        event = await anext(events)
    except asyncio.CancelledError:
        if attempt.timed_out is not None and task.uncancel() == 0:
            raise attempt.timed_out from None
        raise
    finally:
        handle.cancel()
    if attempt.timed_out is not None:  # expired as the event arrived: the event counts
        attempt.timed_out = None
        task.uncancel()
    return event
