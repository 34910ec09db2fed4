"""The trace writer: the request path enqueues, background tasks fan out to the backends.

Each backend has a lane: its own bounded deque and its own task, which takes batches from the
deque and writes them. A slow, hanging or dead backend therefore only fills its own deque:
past the bound the oldest traces are dropped (counted, with a rate-limited warning), and the
other backends and the request path go on at full speed. A failed batch is retried with
capped exponential backoff, then dropped after `max_attempts` so one poisonous batch cannot
block a lane forever. `close()` writes everything queued before returning, within a timeout.

A lane's batches hold at most `batch_size` traces, or the backend's own `batch_size` when it
sets one (SQLite prefers larger transactions). Batching is natural: a lane writes whatever has
queued while its previous batch was in flight, so a quiet gateway writes each trace at once.

`enqueue` must be called from the event loop's thread (it wakes asyncio events).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from server.traces.base import RateLimitedLog, TraceBackend, TraceRecord, describe_error

log = logging.getLogger(__name__)


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


class _Lane:
    """One backend's queue, task and counters."""

    def __init__(self, backend: TraceBackend, writer: TraceWriter) -> None:
        self.backend = backend
        self.writer = writer
        self.queue: deque[TraceRecord] = deque()
        self.inflight: Sequence[TraceRecord] = ()
        self.stats = BackendStats(backend.name)
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.started = asyncio.Event()
        self.closing = False
        self.task: asyncio.Task[None] | None = None
        self.batch_size = backend.batch_size or writer.batch_size

    def push(self, record: TraceRecord) -> None:
        queue = self.queue
        if len(queue) >= self.writer.queue_size:
            queue.popleft()
            self.stats.dropped += 1
            self.writer.warn(
                f"overflow:{id(self)}",
                "trace queue of %s full (%d); dropping the oldest traces (%d dropped so far)",
                self.backend.name,
                self.writer.queue_size,
                self.stats.dropped,
            )
        queue.append(record)
        self.idle.clear()
        self.wake.set()

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
            size = min(self.batch_size, len(queue))
            self.inflight = [queue.popleft() for _ in range(size)]
            await self._write(self.inflight)
            self.inflight = ()

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
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(writer.write_timeout):
                    await self.backend.write_batch(records=batch)
                self.stats.written += len(batch)
                return
            except Exception as exc:
                attempt += 1
                self.stats.failed_batches += 1
                if attempt >= writer.retry.max_attempts:
                    self.stats.dropped += len(batch)
                    writer.warn(
                        f"giveup:{id(self)}",
                        "trace backend %s: dropping a batch of %d after %d attempts (%s)",
                        self.backend.name,
                        len(batch),
                        attempt,
                        describe_error(exc),
                    )
                    return
                delay = writer.retry.delay(attempt)
                writer.warn(
                    f"retry:{id(self)}",
                    "trace backend %s: batch of %d failed (%s); retry %d in %.2fs",
                    self.backend.name,
                    len(batch),
                    describe_error(exc),
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)


class TraceWriter:
    """Fans traces out to every backend, each through its own bounded queue and task."""

    def __init__(
        self,
        backends: Sequence[TraceBackend],
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        retry: WriterRetry | None = None,
        write_timeout: float = 30.0,
        start_timeout: float = 10.0,
        warn_interval: float = 10.0,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self._backends = list(backends)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.retry = retry or WriterRetry()
        self.write_timeout = write_timeout
        self.start_timeout = start_timeout
        self._log = RateLimitedLog(log, warn_interval)
        self._lanes = [_Lane(backend, self) for backend in self._backends]
        self._running = False
        self._closed = False

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
        snapshot = []
        for lane in self._lanes:
            s = lane.stats
            queued = len(lane.queue) + len(lane.inflight)
            snapshot.append(BackendStats(s.backend, s.written, s.dropped, s.failed_batches, queued))
        return snapshot

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
        for lane in self._lanes:
            lane.push(record)

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
            for lane in self._lanes:
                await lane.idle.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Write every queued trace (waiting up to `timeout` seconds), then close the backends.

        Traces still queued at the deadline (a dead backend) are counted as dropped.
        """
        if self._closed:
            return
        if not self._running:
            await self.start()
        self._closed = True
        for lane in self._lanes:
            lane.closing = True
            lane.wake.set()
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for lane in self._lanes:
            lost = len(lane.queue) + len(lane.inflight)
            if lost:
                lane.stats.dropped += lost
                lane.queue.clear()
                lane.inflight = ()
                log.warning(
                    "trace backend %s: %d traces not written before the %.1fs shutdown timeout",
                    lane.backend.name,
                    lost,
                    timeout,
                )
        for lane in self._lanes:
            try:
                async with asyncio.timeout(5.0):
                    await lane.backend.close()
            except Exception as exc:
                log.warning("trace backend %s failed to close: %s", lane.backend.name, describe_error(exc))
