"""A failure the retry policy hands back is freed by reference counting, not left for the
cyclic collector.

A RetryableError whose status is not retried is raised as its `error`, with the RetryableError
as the cause (router._retry_after reads the upstream's Retry-After there). Raised as is, the
error pointed to its cause and the cause (`.error`) back to it: a cycle, holding the traceback's
frames and the call they belong to. These run with the collector off: a weak reference to the
error the caller caught says whether anything but a cycle keeps it once the caller lets go.
"""

from __future__ import annotations

import weakref

from server.config import RetrySettings
from server.core.retry import Deadline, RetryableError, call_with_retries
from server.errors import GatewayError, UpstreamUnavailable
from tests.gc_helpers import collector_off

NOT_RETRIED = RetrySettings(retry_statuses=(503,), retry_connection_errors=False)


async def _fail_with(status: int) -> weakref.ref[GatewayError]:
    async def attempt() -> None:
        raise RetryableError(UpstreamUnavailable("the upstream failed"), status=status, retry_after=2.0)

    try:
        await call_with_retries(attempt, settings=NOT_RETRIED, deadline=Deadline.after(None))
    except UpstreamUnavailable as caught:
        cause = caught.__cause__
        assert isinstance(cause, RetryableError) and cause.retry_after == 2.0  # the router reads it
        del cause
        return weakref.ref(caught)
    raise AssertionError("the attempt's failure was not raised")


async def test_a_status_that_is_not_retried_leaves_no_cycle() -> None:
    with collector_off():
        error = await _fail_with(501)
        assert error() is None, "the error handed back is kept alive by a cycle with its cause"


async def test_a_connection_error_that_is_not_retried_leaves_no_cycle() -> None:
    with collector_off():
        error = await _fail_with(0)
        assert error() is None, "the error handed back is kept alive by a cycle with its cause"
