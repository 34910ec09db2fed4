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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

# Two cores are the common deployment (one worker process per core, LLMGW_WORKERS): more
# threads than cores would only make each huge count slower, not the loop more responsive.
POOL_SIZE: Final = max(1, min(4, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
# One semaphore per event loop: an asyncio primitive belongs to the loop it first waits on.
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="llmgw-offload")
        return _pool


def _semaphore(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(POOL_SIZE)
    return slots


async def run(fn: Callable[[], T]) -> T:
    """`fn()` in the pool, once a slot is free; cancellation while waiting gives the slot up."""
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
        job = _executor().submit(fn)
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
