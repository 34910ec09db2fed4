"""The trace writer: the request path enqueues, background tasks fan out to the backends.

Each backend has a lane: its own bounded deque and its own task, which takes batches from the
deque and writes them. A slow, hanging or dead backend therefore only fills its own deque:
past the bound (`queue_size` traces or `queue_bytes` of trace text, whichever comes first: a
trace holds the whole request and answer, base64 images included) the oldest traces are
dropped (counted, with a rate-limited warning), and the other backends and the request path go
on at full speed. A failed batch is retried with capped exponential backoff, then dropped after
`max_attempts`. A batch the backend *rejects* (`TraceBackend.rejects`: the data itself cannot
be stored, so no retry can help) is split in halves until the offending traces are alone, and
only those are dropped: one poisonous trace never takes the traces around it, nor blocks the
lane. Every drop is counted and logged with its reason. `close()` writes everything queued
before returning, within a timeout.

A lane's batches hold at most `batch_size` traces, or the backend's own `batch_size` when it
sets one (SQLite prefers larger transactions), and at most `batch_bytes` of trace text (but at
least one trace). Batching is natural: a lane writes whatever has queued while its previous
batch was in flight, so a quiet gateway writes each trace at once.

A backend that sets `threaded` (SQLite: blocking calls on a local file) gets a lane whose
batches are taken and written by a dedicated thread instead of a task: a saturated event loop
then neither delays its batches (no round trip through the loop per statement) nor pays for
building its rows. The deque, the bound, the counters, the retries and `close()` are the same.

`enqueue` must be called from the event loop's thread (it wakes asyncio events).

`enqueue_after(record, ready)` queues a trace once `ready` (its scrub, run in the offload pool
for huge texts) has finished; `flush()` and `close()` wait for those first, so a trace still being
scrubbed at shutdown is written, not lost. A scrub that fails drops its trace (counted, logged):
an unscrubbed text never reaches a backend.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.auth.redact import describe_error
from server.traces.base import RateLimitedLog, TraceBackend, TraceRecord, record_size

log = logging.getLogger(__name__)


# A threaded lane writes a batch short of full at most this often: the first trace after a
# quiet spell goes at once, the traces that come while that write is in flight or within this
# interval of its start go together in the next. Per trace, a transaction's fixed cost (the
# commit's WAL frames, the leaf pages of the eight indexes, the checkpoint copying them) falls
# with the batch: on this machine at 1,200 traces/s, 85-88 us of process CPU per trace with a
# 20 ms linger (~25 a batch), 51-62 at 100 ms, 48-50 at 200 ms (user and system time of the
# enqueue, the writer and its checkpointer). A full batch (`batch_size` traces or `batch_bytes`:
# waiting cannot make it larger), `flush()` and `close()` do not wait.
THREAD_WRITE_INTERVAL = 0.1
# Per lane: what a slow store may pin in memory (LLMGW_TRACE_QUEUE_BYTES), and the most one
# batch carries (a COPY, an INSERT body, a transaction), whatever the count bounds allow.
DEFAULT_QUEUE_BYTES = 256 * 1024 * 1024
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WriterRetry:
    """Backoff of a failed batch: delay = min(max_delay, initial * multiplier**n) plus jitter."""

    initial_delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2  # fraction of the delay added at random
    max_attempts: int = 12  # per batch, then the batch is dropped and counted

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return base * (1 + self.jitter * random.random())


@dataclass(slots=True)
class BackendStats:
    """Counters of one backend's lane, for tests and metrics."""

    backend: str
    written: int = 0  # traces the backend accepted
    dropped: int = 0  # traces lost: queue overflow, retries exhausted, or close timed out
    failed_batches: int = 0  # failed write attempts (each retry counts)
    queued: int = 0  # traces waiting, including a batch in flight
    queued_bytes: int = 0  # their `record_size`
    failed_starts: int = 0  # failed attempts to connect/migrate before the first write


class _Lane:
    """One backend's queue, task and counters."""

    def __init__(self, backend: TraceBackend, writer: TraceWriter) -> None:
        self.backend = backend
        self.writer = writer
        # Each trace with its `record_size`, taken once at the enqueue (not again for the batch).
        self.queue: deque[tuple[TraceRecord, int]] = deque()
        self.inflight: Sequence[TraceRecord] = ()
        self.stats = BackendStats(backend.name)
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.started = asyncio.Event()
        self.closing = False
        self.task: asyncio.Task[None] | None = None
        self.batch_size = backend.batch_size or writer.batch_size
        self.queued_bytes = 0  # `record_size` of the deque and the batch in flight
        self.inflight_bytes = 0  # `record_size` of the batch in flight, counted when it was taken
        self.last_error = ""  # why the last write failed, for the shutdown log

    def push(self, record: TraceRecord, size: int) -> None:
        queue = self.queue
        writer = self.writer
        # A trace larger than the whole byte bound still queues when it is alone.
        while queue and (len(queue) >= writer.queue_size or self.queued_bytes + size > writer.queue_bytes):
            self.queued_bytes -= queue.popleft()[1]
            self.stats.dropped += 1
            _warn_overflow(writer, self, self.stats.dropped)
        queue.append((record, size))
        self.queued_bytes += size
        self.idle.clear()
        self.wake.set()

    def take_batch(self) -> list[TraceRecord]:
        """The next batch from the deque: up to `batch_size` traces and `batch_bytes`, at least one."""
        queue = self.queue
        batch: list[TraceRecord] = []
        total = 0
        limit = self.writer.batch_bytes
        while queue and len(batch) < self.batch_size:
            size = queue[0][1]
            if batch and total + size > limit:
                break
            batch.append(queue.popleft()[0])
            total += size
        self.inflight_bytes = total
        return batch

    def notify_close(self) -> None:
        """Ask the lane to finish once its queue is empty (called by `TraceWriter.close`)."""
        self.closing = True
        self.wake.set()

    def snapshot(self) -> BackendStats:
        s = self.stats
        queued = len(self.queue) + len(self.inflight)
        return BackendStats(
            s.backend, s.written, s.dropped, s.failed_batches, queued, self.queued_bytes, s.failed_starts
        )

    def abandon(self) -> int:
        """Give up on what is still queued or in flight (close timed out); returns how many."""
        lost = len(self.queue) + len(self.inflight)
        self.queue.clear()
        self.inflight = ()
        self.queued_bytes = 0
        self.stats.dropped += lost
        _log_abandoned(self, lost)
        return lost

    async def run(self) -> None:
        await self._start_backend()
        queue = self.queue
        while True:
            if not queue:
                self.idle.set()
                if self.closing:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = self.inflight = self.take_batch()
            await self._write(batch)
            self.inflight = ()
            self.queued_bytes -= self.inflight_bytes

    async def _start_backend(self) -> None:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.writer.write_timeout):
                    await self.backend.start()
                self.started.set()
                return
            except Exception as exc:
                attempt += 1
                self.stats.failed_starts += 1
                delay = self.writer.retry.delay(attempt)
                self.writer.warn(
                    f"start:{id(self)}",
                    "trace backend %s failed to start (%s); retrying in %.1fs",
                    self.backend.name,
                    describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _write(self, batch: Sequence[TraceRecord]) -> None:
        writer = self.writer
        pending: list[Sequence[TraceRecord]] = [batch]  # parts still to write, the next one last
        while pending:
            part = pending.pop()
            attempt = 0
            while True:
                try:
                    async with asyncio.timeout(writer.write_timeout):
                        await self.backend.write_batch(records=part)
                    self.stats.written += len(part)
                    self.last_error = ""  # the store works again
                    break
                except Exception as exc:
                    self.stats.failed_batches += 1
                    self.last_error = describe_error(exc)
                    if self.backend.rejects(exc):
                        if len(part) > 1:
                            pending.extend(_halves(part))
                        else:
                            self.stats.dropped += 1
                            _warn_rejected(writer, self, exc)
                        break
                    attempt += 1
                    if attempt >= writer.retry.max_attempts:
                        self.stats.dropped += len(part)
                        _warn_giveup(writer, self, len(part), attempt, exc)
                        break
                    delay = writer.retry.delay(attempt)
                    _warn_retry(writer, self, len(part), attempt, delay, exc)
                    await asyncio.sleep(delay)


class _ThreadedLane(_Lane):
    """A lane whose batches are taken and written by a dedicated thread (`backend.threaded`).

    The loop thread only appends to the deque (atomic in CPython) and, when the thread sleeps,
    sets a threading.Event; at saturation the thread is always busy, so an enqueue costs an
    append and two attribute checks. The thread takes batches from the left of the deque under
    `lock`, which also guards `inflight` and the written/dropped accounting, so `idle` (checked
    on the loop under the same lock) is set only when nothing is queued, held or being written.
    The task of the lane starts the backend on the loop (with retries), starts the thread, and
    waits for it to finish after `close()`. Counters written by the thread are only written by
    it; `dropped` has a part per thread so no update is lost.
    """

    def __init__(self, backend: TraceBackend, writer: TraceWriter) -> None:
        super().__init__(backend, writer)
        self.lock = threading.Lock()
        self.thread_wake = threading.Event()
        self.thread_stop = threading.Event()  # set when close() gives up on the lane
        # Wakes the thread from its wait for the interval: set when a batch is full, and by
        # flush(), close() and abandon(). Only a wake-up: the thread clears it before it decides
        # to wait, then checks again (`_batch_due`), so neither a lost set nor a stale one (a
        # full batch already taken) changes what it does.
        self.thread_hurry = threading.Event()
        self.flushes = 0  # flush() calls waiting for this lane (the loop's): no waiting meanwhile
        # What the thread writes without waiting for the interval: a full batch, or half the
        # queue's bound when that is smaller (a small LLMGW_TRACE_QUEUE_BYTES): past it, waiting
        # cannot make the batch larger, only drop the oldest traces.
        self.due_count = min(self.batch_size, max(1, writer.queue_size // 2))
        self.due_bytes = min(writer.batch_bytes, max(1, writer.queue_bytes // 2))
        self.last_write = -THREAD_WRITE_INTERVAL  # monotonic start of the latest batch write
        self.sleeping = False
        self.abandoned = False
        self.dropped_in_thread = 0
        # Bytes queued = queued_bytes (added by pushes, less overflow drops: the loop's) minus
        # bytes_done (batches finished or given up: the thread's); one writer each, no lost update.
        self.bytes_done = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def push(self, record: TraceRecord, size: int) -> None:
        queue = self.queue
        writer = self.writer
        while queue and (
            len(queue) >= writer.queue_size or self.queued_bytes - self.bytes_done + size > writer.queue_bytes
        ):
            try:
                oldest = queue.popleft()
            except IndexError:  # the thread took the whole queue meanwhile
                break
            self.queued_bytes -= oldest[1]
            self.stats.dropped += 1
            _warn_overflow(writer, self, self.stats.dropped + self.dropped_in_thread)
        queue.append((record, size))
        self.queued_bytes += size
        self.idle.clear()
        # A full batch (by count, or by bytes: big traces) does not wait for the interval. The
        # bytes include a batch in flight: a spurious wake-up only, the thread checks again.
        if len(queue) >= self.due_count or self.queued_bytes - self.bytes_done >= self.due_bytes:
            self.thread_hurry.set()
        if self.sleeping:
            self.sleeping = False
            self.thread_wake.set()

    def notify_close(self) -> None:
        self.closing = True
        self.sleeping = False
        self.thread_hurry.set()
        self.thread_wake.set()

    def begin_flush(self) -> None:
        """Write what is queued without waiting for the interval, until `end_flush` (flush)."""
        self.flushes += 1
        self.thread_hurry.set()

    def end_flush(self) -> None:
        self.flushes -= 1

    def snapshot(self) -> BackendStats:
        s = self.stats
        with self.lock:
            queued = len(self.queue) + len(self.inflight)
            return BackendStats(
                s.backend,
                s.written,
                s.dropped + self.dropped_in_thread,
                s.failed_batches,
                queued,
                self.queued_bytes - self.bytes_done,
                s.failed_starts,
            )

    def abandon(self) -> int:
        with self.lock:
            self.abandoned = True
            self.thread_stop.set()
            self.thread_hurry.set()
            self.thread_wake.set()
            lost = len(self.queue) + len(self.inflight)
            self.queue.clear()
            self.inflight = ()
            self.stats.dropped += lost
            self.bytes_done = self.queued_bytes  # the thread no longer touches it
        _log_abandoned(self, lost)
        return lost

    async def run(self) -> None:
        await self._start_backend()
        loop = self.loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        thread = threading.Thread(
            target=self._thread_main,
            args=(finished,),
            name=f"trace-writer-{self.backend.name}",
            daemon=True,  # close() bounds the wait; a hung write must not hang the exit
        )
        thread.start()
        await done  # close() cancels this at its deadline, then abandons the lane
        self._check_idle()

    def _check_idle(self) -> None:
        """On the loop: set `idle` when nothing is queued, taken or being written."""
        with self.lock:
            if not self.queue and not self.inflight:
                self.idle.set()

    def _call_on_loop(self, callback: Callable[[], None]) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _thread_main(self, finished: Callable[[], None]) -> None:
        queue = self.queue
        try:
            while True:
                if queue and not self._batch_due():
                    # Let a batch gather (THREAD_WRITE_INTERVAL): a small transaction costs
                    # several times the CPU per trace of a large one.
                    wait = self.last_write + THREAD_WRITE_INTERVAL - time.monotonic()
                    if wait > 0:
                        self.thread_hurry.clear()
                        if not self._batch_due():  # else it came between the check and the clear
                            self.thread_hurry.wait(wait)
                with self.lock:
                    if self.abandoned:
                        return
                    batch = self._take_batch_threaded()
                    if batch:
                        self.inflight = batch
                if batch:
                    self.last_write = time.monotonic()
                    self._write_sync(batch)
                    continue
                if self.closing:
                    return
                # Going to sleep: tell the loop (flush waits for it), then wait for a push.
                self._call_on_loop(self._check_idle)
                self.thread_wake.clear()
                self.sleeping = True
                if queue or self.closing or self.abandoned:
                    self.sleeping = False
                    continue
                self.thread_wake.wait()
        except BaseException:
            log.exception("trace writer thread of %s died", self.backend.name)
            raise
        finally:
            self._call_on_loop(finished)

    def _batch_due(self) -> bool:
        """Whether the thread writes what is queued now, without waiting for the interval: a
        full batch (`due_count`, `due_bytes`), a flush(), close() or abandon()."""
        return (
            len(self.queue) >= self.due_count
            or self.queued_bytes - self.bytes_done >= self.due_bytes  # no batch in flight here
            or self.flushes > 0
            or self.closing
            or self.abandoned
        )

    def _take_batch_threaded(self) -> list[TraceRecord]:
        """`take_batch` from the thread, under `lock`: the loop may pop the oldest meanwhile."""
        queue = self.queue
        batch: list[TraceRecord] = []
        total = 0
        limit = self.writer.batch_bytes
        while len(batch) < self.batch_size:
            try:
                oldest = queue[0]
            except IndexError:
                break
            size = oldest[1]
            if batch and total + size > limit:
                break
            try:
                taken = queue.popleft()
            except IndexError:  # an overflow on the loop took the oldest meanwhile
                break
            if taken is not oldest:  # the loop dropped `oldest` between the two calls
                size = taken[1]
            batch.append(taken[0])
            total += size
        self.inflight_bytes = total
        return batch

    def _write_sync(self, batch: list[TraceRecord]) -> None:
        """Write `batch`, splitting it when the backend rejects some trace; returns early when abandoned."""
        writer = self.writer
        pending: list[Sequence[TraceRecord]] = [batch]  # parts still to write, the next one last
        while pending:
            part = pending.pop()
            attempt = 0
            while True:
                try:
                    self.backend.write_batch_sync(part)
                except Exception as exc:
                    self.stats.failed_batches += 1
                    self.last_error = describe_error(exc)
                    if self.backend.rejects(exc):
                        if len(part) > 1:
                            pending.extend(_halves(part))
                        else:
                            self._count_dropped(1)
                            _warn_rejected(writer, self, exc)
                        break
                    attempt += 1
                    if attempt >= writer.retry.max_attempts:
                        self._count_dropped(len(part))
                        _warn_giveup(writer, self, len(part), attempt, exc)
                        break
                    delay = writer.retry.delay(attempt)
                    _warn_retry(writer, self, len(part), attempt, delay, exc)
                    if self.thread_stop.wait(delay):
                        return  # abandoned by close(): the batch is already counted as dropped
                    continue
                with self.lock:
                    if not self.abandoned:  # else close() counted it as dropped already
                        self.stats.written += len(part)
                self.last_error = ""  # the store works again
                break
        with self.lock:
            if not self.abandoned:
                self.inflight = ()
                self.bytes_done += self.inflight_bytes

    def _count_dropped(self, count: int) -> None:
        with self.lock:
            if not self.abandoned:  # else close() counted the whole batch already
                self.dropped_in_thread += count


class TraceWriter:
    """Fans traces out to every backend, each through its own bounded queue and task."""

    def __init__(
        self,
        backends: Sequence[TraceBackend],
        *,
        queue_size: int = 10_000,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        batch_size: int = 500,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        retry: WriterRetry | None = None,
        write_timeout: float = 30.0,
        start_timeout: float = 10.0,
        warn_interval: float = 10.0,
    ) -> None:
        if min(queue_size, queue_bytes, batch_size, batch_bytes) < 1:
            raise ValueError("queue_size, queue_bytes, batch_size and batch_bytes must be at least 1")
        self._backends = list(backends)
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.retry = retry or WriterRetry()
        self.write_timeout = write_timeout
        self.start_timeout = start_timeout
        self._log = RateLimitedLog(log, warn_interval)
        self._lanes = [
            (_ThreadedLane if backend.threaded else _Lane)(backend, self) for backend in self._backends
        ]
        self._running = False
        self._closed = False
        self._preparing: set[asyncio.Task[None]] = set()  # `enqueue_after` traces not ready yet

    @property
    def backends(self) -> list[TraceBackend]:
        return list(self._backends)

    @property
    def reader(self) -> TraceBackend | None:
        """The backend reads come from: the first one (None without backends)."""
        return self._backends[0] if self._backends else None

    @property
    def stats(self) -> list[BackendStats]:
        """A snapshot of each backend's counters, in backend order."""
        return [lane.snapshot() for lane in self._lanes]

    def stats_for(self, name: str) -> BackendStats:
        """The counters of the first backend called `name`."""
        for stats in self.stats:
            if stats.backend == name:
                return stats
        raise KeyError(name)

    def warn(self, key: str, message: str, *args: object) -> None:
        self._log.warning(key, message, *args)

    def enqueue(self, record: TraceRecord) -> None:
        """Queue one trace for every backend; never blocks, never raises."""
        if self._closed:
            for lane in self._lanes:
                lane.stats.dropped += 1
            self.warn("closed", "trace writer is closed; dropping a trace")
            return
        size = record_size(record)
        for lane in self._lanes:
            lane.push(record, size)

    def enqueue_after(self, record: TraceRecord, ready: Awaitable[object]) -> None:
        """Queue `record` once `ready` has finished (it scrubs the record); never blocks.

        If `ready` raises (or is cancelled: close() timed out), the trace is dropped, counted and
        logged, never queued as it is. Call from the event loop's thread.
        """
        task = asyncio.ensure_future(self._when_ready(record, ready))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _when_ready(self, record: TraceRecord, ready: Awaitable[object]) -> None:
        try:
            await ready
        except BaseException as exc:
            for lane in self._lanes:
                lane.stats.dropped += 1
            reason = describe_error(exc)
            self.warn("unready", "dropping trace %s: its scrub did not finish (%s)", record.id, reason)
            if not isinstance(exc, Exception):
                raise
            return
        self.enqueue(record)

    async def _await_preparing(self) -> None:
        while self._preparing:  # a trace made ready may not add another, but be safe
            await asyncio.gather(*self._preparing, return_exceptions=True)

    async def start(self) -> None:
        """Start each backend and its task; waits up to `start_timeout` for the reader, never raises.

        Only the first backend (the one reads come from) is waited for: the others only write,
        and a dead one must not delay start-up. A backend that is not up keeps retrying in the
        background, its queue filling.
        """
        if self._running or self._closed:
            return
        self._running = True
        for lane in self._lanes:
            lane.task = asyncio.create_task(lane.run(), name=f"trace-writer-{lane.backend.name}")
        awaited = self._lanes[:1]
        waits = [asyncio.create_task(lane.started.wait()) for lane in awaited]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.start_timeout)
            for wait in pending:
                wait.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for lane in awaited:
                if not lane.started.is_set():
                    log.warning(
                        "trace backend %s not started after %.1fs; retrying in the background",
                        lane.backend.name,
                        self.start_timeout,
                    )

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queue is empty and written; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._await_preparing()
            threaded = [lane for lane in self._lanes if isinstance(lane, _ThreadedLane)]
            for lane in threaded:
                lane.begin_flush()
            try:
                for waited in self._lanes:
                    await waited.idle.wait()
            finally:
                for lane in threaded:
                    lane.end_flush()

    async def close(self, timeout: float = 10.0) -> None:
        """Write every queued trace (waiting up to `timeout` seconds), then close the backends.

        Traces still queued at the deadline (a dead backend) are counted as dropped.
        """
        if self._closed:
            return
        if not self._running:
            await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._preparing:  # traces still being scrubbed: queue them before closing
            _, late = await asyncio.wait(set(self._preparing), timeout=timeout)
            for task in late:
                task.cancel()  # dropped and counted by _when_ready
            await asyncio.gather(*late, return_exceptions=True)
            timeout = max(0.0, deadline - loop.time())
        self._closed = True
        for lane in self._lanes:
            lane.notify_close()
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for lane in self._lanes:
            lost = lane.abandon()
            if lost:
                log.warning(
                    "trace backend %s: %d traces not written before the %.1fs shutdown timeout",
                    lane.backend.name,
                    lost,
                    timeout,
                )
        for stats in self.stats:
            if stats.dropped:  # the overflow warnings are rate-limited: one exact total at the end
                log.warning(
                    "trace backend %s closed: %d traces written (%d dropped so far)",
                    stats.backend,
                    stats.written,
                    stats.dropped,
                )
        for lane in self._lanes:
            try:
                async with asyncio.timeout(5.0):
                    await lane.backend.close()
            except Exception as exc:
                log.warning("trace backend %s failed to close: %s", lane.backend.name, describe_error(exc))


def _halves(part: Sequence[TraceRecord]) -> list[Sequence[TraceRecord]]:
    """`part` split in two, as a `pending` stack: the first half is popped (written) first."""
    half = len(part) // 2
    return [part[half:], part[:half]]


def _warn_overflow(writer: TraceWriter, lane: Any, dropped: int) -> None:
    writer.warn(
        f"overflow:{id(lane)}",
        "trace queue of %s full (%d traces or %d bytes); dropping the oldest traces (%d dropped so far)",
        lane.backend.name,
        writer.queue_size,
        writer.queue_bytes,
        dropped,
    )


def _warn_rejected(writer: TraceWriter, lane: Any, exc: BaseException) -> None:
    writer.warn(
        f"rejected:{id(lane)}",
        "trace backend %s rejected a trace; dropping it, the others of its batch are written (%s)",
        lane.backend.name,
        describe_error(exc),
    )


def _log_abandoned(lane: Any, lost: int) -> None:
    """Say why traces were lost at shutdown when the store was failing (close() logs the count)."""
    if lost and lane.last_error:
        log.warning(
            "trace backend %s: %d traces dropped at shutdown; its last write failed: %s",
            lane.backend.name,
            lost,
            lane.last_error,
        )


def _warn_giveup(writer: TraceWriter, lane: Any, size: int, attempt: int, exc: BaseException) -> None:
    writer.warn(
        f"giveup:{id(lane)}",
        "trace backend %s: dropping a batch of %d after %d attempts (%s)",
        lane.backend.name,
        size,
        attempt,
        describe_error(exc),
    )


def _warn_retry(
    writer: TraceWriter, lane: Any, size: int, attempt: int, delay: float, exc: BaseException
) -> None:
    writer.warn(
        f"retry:{id(lane)}",
        "trace backend %s: batch of %d failed (%s); retry %d in %.2fs",
        lane.backend.name,
        size,
        describe_error(exc),
        attempt,
        delay,
    )
