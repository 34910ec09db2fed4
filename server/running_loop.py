"""The running event loop, looked up once per loop instead of on every call.

asyncio.get_running_loop() (and current_task() without a loop) makes a getpid() system call on
Python 3.11 (its fork check), several times per request on the hot paths. A loop remembered
must still be the one running this code, though: an object kept across loops (a client used by
one loop, then by another while the first is stopped but not closed) would otherwise hand the
new loop's callers futures of the old one ("attached to a different loop"), or
`current_task(old_loop)` would answer None. A loop that is running, in the thread that looked
it up, is the running loop of that thread: one loop runs per thread at a time.
"""

from __future__ import annotations

import asyncio
import threading


class RunningLoop:
    """The loop running the caller, remembered while it keeps running in the same thread."""

    __slots__ = ("_loop", "_thread")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def get(self) -> asyncio.AbstractEventLoop:
        """The running loop (RuntimeError outside one, as asyncio.get_running_loop())."""
        loop = self._loop
        thread = threading.get_ident()  # no system call, unlike getpid()
        if loop is None or thread != self._thread or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
            self._thread = thread
        return loop
