"""CPU-heavy work of one request, run off the event loop in a small bounded thread pool.

Threads suffice because the work sent here is tiktoken's Rust core, which releases the GIL while
it encodes (`py.allow_threads`): measured on a shared 2-core machine, four 1.9-million-character
encodes through this pool left the loop's worst lag at 40 ms (English) to 120 ms (CJK, 5.8 s of
encoding inline). A process pool would also pickle megabytes of text each way and load the
vocabularies once per process.

At most `POOL_SIZE` jobs run at once; further callers wait on an asyncio semaphore, so they hold
no thread and queue nothing inside the executor, and a caller cancelled while it waits (its
deadline passed, its client went away) simply stops waiting. A job already running cannot be
stopped; it keeps its slot until it finishes, so the bound holds even then.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

# Two cores are the common deployment (one worker process per core, LLMGW_WORKERS): more
# threads than cores would only make each huge count slower, not the loop more responsive.
POOL_SIZE: Final = max(1, min(4, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class _Slots:
    """A semaphore for one loop that, unlike asyncio.Semaphore, keeps no reference to the loop
    (kept as a value of a WeakKeyDictionary keyed by the loop, that reference kept every loop
    that ever waited alive: tests run many loops). A released slot goes straight to the first
    waiter still waiting; a waiter cancelled after it was handed one passes it on."""

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: the next waiter gets it
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:  # a release already passed over it
                    pass
            raise

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


# One set of slots per event loop (one per worker process in production; tests run many).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = weakref.WeakKeyDictionary()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="llmgw-offload")
        return _pool


def _semaphore(loop: asyncio.AbstractEventLoop) -> _Slots:
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = _Slots(POOL_SIZE)
    return slots


class OffloadedJobError(RuntimeError):
    """A job in the pool raised a BaseException that is not an Exception."""


def _guarded(fn: Callable[[], T]) -> T:
    # pyo3's PanicException (tiktoken) derives from BaseException: reaching the caller as such it
    # would pass every `except Exception` of the servicers and leave the call unanswered until
    # its deadline. A worker thread never sees KeyboardInterrupt or SystemExit.
    try:
        return fn()
    except Exception:
        raise
    except BaseException as exc:
        raise OffloadedJobError(f"{type(exc).__name__}: {exc}") from exc


async def run(fn: Callable[[], T]) -> T:
    """`fn()` in the pool, once a slot is free; cancellation while waiting gives the slot up.

    A BaseException that is not an Exception (pyo3's PanicException) raised by `fn` reaches the
    caller as `OffloadedJobError` (from it)."""
    loop = asyncio.get_running_loop()
    slots = _semaphore(loop)
    await slots.acquire()

    def release(_: Future[T]) -> None:
        # Runs in the worker thread (or here, if the job never started).
        try:
            loop.call_soon_threadsafe(slots.release)
        except RuntimeError:  # the loop is closed: nobody is left to wait on the slot
            pass

    try:
        job = _executor().submit(_guarded, fn)
    except BaseException:
        slots.release()
        raise
    job.add_done_callback(release)
    # wrap_future: cancelling this await cancels a job still queued, never one running, and the
    # slot is released by the job's own completion either way.
    return await asyncio.wrap_future(job)


async def run_if(off: bool, fn: Callable[[], T]) -> T:
    """`fn()` in the pool when `off`, else right here (no thread hop for normal requests)."""
    if off:
        return await run(fn)
    return fn()
