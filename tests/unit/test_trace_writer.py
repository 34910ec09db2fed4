"""The trace writer: fan-out, isolation of a dead backend, bounded queues, retries, shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest

from server.traces import writer as writer_module
from server.traces.base import TraceBackend, TraceRecord, new_trace_id, record_size
from server.traces.writer import TraceWriter, WriterRetry

FAST_RETRY = WriterRetry(initial_delay=0.001, max_delay=0.01, jitter=0.0, max_attempts=1000)


def make_record(i: int = 0) -> TraceRecord:
    return TraceRecord(id=new_trace_id(), created_at=datetime.now(UTC), step_id=f"step-{i}")


class MemoryBackend(TraceBackend):
    """Keeps what it is given; can be told to fail, hang or be slow."""

    def __init__(self, name: str = "memory", *, fail_times: int = 0, delay: float = 0.0) -> None:
        self.name = name
        self.records: list[TraceRecord] = []
        self.batches: list[int] = []
        self.fail_times = fail_times
        self.delay = delay
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("transient failure")
        self.batches.append(len(records))
        self.records.extend(records)


class DeadBackend(TraceBackend):
    """Every write raises."""

    name = "dead"

    def __init__(self) -> None:
        self.attempts = 0

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        self.attempts += 1
        raise ConnectionError("connection refused to postgresql://gw:hunter2@db/traces")


class HangingBackend(TraceBackend):
    """Every write waits forever."""

    name = "hanging"

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        await asyncio.Event().wait()


class NeverStartsBackend(TraceBackend):
    name = "never-starts"

    async def start(self) -> None:
        raise OSError("no route to host")

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        raise AssertionError("never started, never written")


@pytest.mark.parametrize("dead", [DeadBackend, HangingBackend, NeverStartsBackend])
async def test_a_dead_backend_does_not_stop_the_other(dead: type[TraceBackend]) -> None:
    good = MemoryBackend()
    writer = TraceWriter(
        [dead(), good], queue_size=100, batch_size=10, retry=FAST_RETRY, write_timeout=0.05, start_timeout=0.2
    )
    await writer.start()
    records = [make_record(i) for i in range(1000)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    for record in records:
        writer.enqueue(record)
        await asyncio.sleep(0)  # let the lanes run between requests, as a server would
    enqueue_time = loop.time() - began
    await asyncio.wait_for(_until(lambda: len(good.records) == len(records)), 10)
    assert [r.id for r in good.records] == [r.id for r in records]
    assert enqueue_time < 5
    stats = writer.stats
    assert stats[1].written == 1000 and stats[1].dropped == 0
    # Bounded: at most the queue plus one batch in flight is kept, the rest is dropped.
    assert stats[0].written == 0 and stats[0].dropped + stats[0].queued == 1000
    assert stats[0].queued <= 100 + 10
    await writer.close(timeout=0.2)
    assert good.closed
    assert writer.stats[0].dropped + writer.stats[0].written == 1000


async def _until(condition: object, interval: float = 0.005) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(interval)


async def test_batches_are_bounded_by_batch_size() -> None:
    backend = MemoryBackend(delay=0.01)
    writer = TraceWriter([backend], batch_size=50)
    await writer.start()
    for i in range(1000):
        writer.enqueue(make_record(i))
    await writer.flush(timeout=10)
    assert sum(backend.batches) == 1000
    assert max(backend.batches) <= 50
    assert len(backend.batches) < 100  # batched, not one write per trace
    await writer.close(timeout=1)


async def test_queue_overflow_drops_the_oldest_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    writer = TraceWriter([backend], queue_size=10, batch_size=5)
    records = [make_record(i) for i in range(25)]
    with caplog.at_level(logging.WARNING, logger="server.traces.writer"):
        for record in records:  # not started: nothing drains
            writer.enqueue(record)
    assert writer.stats_for("memory").dropped == 15
    assert writer.stats_for("memory").queued == 10
    overflow = [r for r in caplog.records if "full" in r.getMessage()]
    assert len(overflow) == 1  # rate-limited: one warning for 15 drops
    await writer.close(timeout=5)
    assert [r.id for r in backend.records] == [r.id for r in records[15:]]
    assert writer.stats_for("memory").written == 10


async def test_retries_a_failed_batch_until_it_succeeds() -> None:
    backend = MemoryBackend(fail_times=3)
    writer = TraceWriter([backend], retry=FAST_RETRY)
    await writer.start()
    records = [make_record(i) for i in range(20)]
    for record in records:
        writer.enqueue(record)
    await writer.flush(timeout=5)
    assert [r.id for r in backend.records] == [r.id for r in records]
    stats = writer.stats_for("memory")
    assert stats.failed_batches == 3 and stats.written == 20 and stats.dropped == 0
    await writer.close(timeout=1)


async def test_gives_up_on_a_batch_after_max_attempts() -> None:
    backend = MemoryBackend(fail_times=2)
    retry = WriterRetry(initial_delay=0.001, max_delay=0.001, jitter=0, max_attempts=2)
    writer = TraceWriter([backend], batch_size=10, retry=retry)
    for i in range(10):
        writer.enqueue(make_record(i))
    await writer.start()
    await writer.flush(timeout=5)
    writer.enqueue(make_record(99))
    await writer.flush(timeout=5)
    stats = writer.stats_for("memory")
    assert stats.dropped == 10 and stats.failed_batches == 2 and stats.written == 1
    await writer.close(timeout=1)


async def test_close_writes_everything_queued() -> None:
    slow = MemoryBackend("slow", delay=0.005)
    fast = MemoryBackend("fast")
    writer = TraceWriter([slow, fast], batch_size=100)
    await writer.start()
    records = [make_record(i) for i in range(5000)]
    for record in records:
        writer.enqueue(record)
    await writer.close(timeout=30)
    for backend in (slow, fast):
        assert [r.id for r in backend.records] == [r.id for r in records]
        assert backend.closed
    assert all(s.written == 5000 and s.dropped == 0 and s.queued == 0 for s in writer.stats)


async def test_close_without_start_still_writes() -> None:
    backend = MemoryBackend()
    writer = TraceWriter([backend])
    writer.enqueue(make_record())
    await writer.close(timeout=5)
    assert len(backend.records) == 1 and backend.started and backend.closed


async def test_close_gives_up_on_a_hanging_backend_at_the_deadline() -> None:
    good = MemoryBackend()
    writer = TraceWriter([HangingBackend(), good], write_timeout=60)
    await writer.start()
    for i in range(10):
        writer.enqueue(make_record(i))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await writer.close(timeout=0.3)
    assert loop.time() - began < 5
    assert len(good.records) == 10
    assert writer.stats_for("hanging").dropped == 10


async def test_enqueue_after_close_is_counted_not_raised() -> None:
    backend = MemoryBackend()
    writer = TraceWriter([backend])
    await writer.start()
    await writer.close(timeout=1)
    writer.enqueue(make_record())
    assert writer.stats_for("memory").dropped == 1
    assert backend.records == []


async def test_failure_logs_carry_no_password(caplog: pytest.LogCaptureFixture) -> None:
    writer = TraceWriter([DeadBackend()], retry=FAST_RETRY)
    with caplog.at_level(logging.DEBUG):
        await writer.start()
        writer.enqueue(make_record())
        await asyncio.sleep(0.05)
        await writer.close(timeout=0.05)
    assert caplog.records
    assert all("hunter2" not in r.getMessage() for r in caplog.records)


async def test_reader_is_the_first_backend() -> None:
    first, second = MemoryBackend("a"), MemoryBackend("b")
    assert TraceWriter([first, second]).reader is first
    assert TraceWriter([]).reader is None


async def test_enqueue_is_cheap() -> None:
    writer = TraceWriter([MemoryBackend("a"), MemoryBackend("b")], queue_size=200_000)
    records = [make_record(i) for i in range(100_000)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    for record in records:
        writer.enqueue(record)
    per_trace_us = (loop.time() - began) / len(records) * 1e6
    print(f"enqueue: {per_trace_us:.2f} us per trace with two backends")
    assert writer.stats_for("a").queued == 100_000
    await writer.close(timeout=30)


def test_retry_delay_is_capped_and_grows() -> None:
    retry = WriterRetry(initial_delay=0.1, multiplier=2, max_delay=1.0, jitter=0)
    assert [retry.delay(n) for n in (1, 2, 3, 4, 10)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    jittered = WriterRetry(initial_delay=1, jitter=0.5)
    assert all(1 <= jittered.delay(1) <= 1.5 for _ in range(100))


# --- threaded lanes (backends that write with blocking calls from the writer's own thread) ---


class ThreadedBackend(MemoryBackend):
    """A MemoryBackend whose writes are blocking calls, run by the writer's thread."""

    threaded = True

    def __init__(self, name: str = "threaded", *, fail_times: int = 0, hang: bool = False) -> None:
        super().__init__(name, fail_times=fail_times)
        self.hang = threading.Event() if hang else None
        self.threads: set[str] = set()

    def write_batch_sync(self, records: Sequence[TraceRecord]) -> None:
        self.threads.add(threading.current_thread().name)
        if self.hang is not None:
            self.hang.wait(5)
            raise ConnectionError("hung")
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("transient failure")
        self.batches.append(len(records))
        self.records.extend(records)


async def test_threaded_lane_writes_in_order_from_its_thread_and_flushes_on_close() -> None:
    backend = ThreadedBackend(fail_times=2)
    writer = TraceWriter([backend, MemoryBackend()], batch_size=100, retry=FAST_RETRY)
    await writer.start()
    records = [make_record(i) for i in range(5000)]
    for record in records[:2500]:
        writer.enqueue(record)
    await writer.flush(timeout=10)
    assert writer.stats_for("threaded").written == 2500 and writer.stats_for("threaded").queued == 0
    for record in records[2500:]:
        writer.enqueue(record)
    await writer.close(timeout=10)
    assert [r.id for r in backend.records] == [r.id for r in records]
    assert backend.threads == {"trace-writer-threaded"} and backend.closed
    stats = writer.stats_for("threaded")
    assert (stats.written, stats.dropped, stats.failed_batches, stats.queued) == (5000, 0, 2, 0)


async def test_threaded_lane_drops_the_oldest_and_gives_up_after_max_attempts() -> None:
    backend = ThreadedBackend(fail_times=2)
    retry = WriterRetry(initial_delay=0.001, max_delay=0.001, jitter=0, max_attempts=2)
    writer = TraceWriter([backend], queue_size=10, batch_size=10, retry=retry)
    records = [make_record(i) for i in range(25)]
    for record in records:  # not started: the 15 oldest are dropped
        writer.enqueue(record)
    await writer.start()
    await writer.flush(timeout=5)  # the first batch fails twice and is dropped
    writer.enqueue(records[0])
    await writer.close(timeout=5)
    stats = writer.stats_for("threaded")
    assert (stats.written, stats.dropped, stats.failed_batches) == (1, 25, 2)


async def test_close_gives_up_on_a_hanging_threaded_backend_at_the_deadline() -> None:
    hanging, good = ThreadedBackend(hang=True), MemoryBackend()
    writer = TraceWriter([hanging, good], retry=FAST_RETRY)
    await writer.start()
    for i in range(10):
        writer.enqueue(make_record(i))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await writer.close(timeout=0.3)
    assert loop.time() - began < 2
    assert len(good.records) == 10
    assert writer.stats_for("threaded").dropped == 10 and writer.stats_for("threaded").written == 0
    assert hanging.hang is not None
    hanging.hang.set()


# --- the threaded lane's write interval (THREAD_WRITE_INTERVAL) ---


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_threaded_lane_writes_the_first_trace_after_a_quiet_spell_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An interval far longer than the test: only "at once" can pass it, and only the interval
    # (not a fixed linger before every batch) keeps the traces after it waiting.
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = ThreadedBackend()
    writer = TraceWriter([backend])
    await writer.start()
    writer.enqueue(make_record(0))
    await _wait_for(lambda: backend.batches == [1])
    for i in range(1, 20):  # within the interval of the first write: they gather
        writer.enqueue(make_record(i))
    await asyncio.sleep(0.2)
    assert backend.batches == [1]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await writer.flush(timeout=5)  # flush does not wait out the interval
    assert loop.time() - began < 5
    assert backend.batches == [1, 19]
    writer.enqueue(make_record(20))
    began = loop.time()
    await writer.close(timeout=5)  # nor does close
    assert loop.time() - began < 5
    assert backend.batches == [1, 19, 1] and writer.stats_for("threaded").written == 21


async def test_threaded_lane_under_load_writes_one_batch_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 3.0)
    backend = ThreadedBackend()
    writer = TraceWriter([backend])
    await writer.start()
    for i in range(40):  # 40 traces over ~0.2 s: the first at once, the rest in one batch
        writer.enqueue(make_record(i))
        await asyncio.sleep(0.005)
    await _wait_for(lambda: sum(backend.batches) == 40)
    assert backend.batches == [1, 39]
    await writer.close(timeout=5)


async def test_threaded_lane_writes_a_full_batch_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = ThreadedBackend()
    writer = TraceWriter([backend], batch_size=10)
    await writer.start()
    writer.enqueue(make_record(0))
    await _wait_for(lambda: backend.batches == [1])
    for i in range(1, 4):
        writer.enqueue(make_record(i))
    await asyncio.sleep(0.2)  # the thread now waits out the interval for these three
    for i in range(4, 31):
        writer.enqueue(make_record(i))
    await _wait_for(lambda: sum(backend.batches) == 31)  # a full batch, then the rest: at once
    assert backend.batches[:2] == [1, 10]
    await writer.close(timeout=5)


class GatedThreadedBackend(ThreadedBackend):
    """A ThreadedBackend whose writes wait for `gate` (set: they go at once); `writing` is set
    while a write waits at the closed gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def write_batch_sync(self, records: Sequence[TraceRecord]) -> None:
        if not self.gate.is_set():
            self.writing.set()
            self.gate.wait(5)
        super().write_batch_sync(records)


async def test_threaded_lane_after_a_full_batch_the_rest_still_waits_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full batch goes at once; the traces short of full queued behind it must still wait for
    # the interval, not be written back to back in tiny transactions until the queue empties.
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = GatedThreadedBackend()
    writer = TraceWriter([backend], batch_size=10)
    await writer.start()
    writer.enqueue(make_record(0))
    await _wait_for(lambda: backend.batches == [1])
    backend.gate.clear()
    for i in range(1, 11):  # a full batch: written at once, its write held at the gate
        writer.enqueue(make_record(i))
    await _wait_for(backend.writing.is_set)
    for i in range(11, 14):  # three more while the full batch is written
        writer.enqueue(make_record(i))
    backend.gate.set()
    await _wait_for(lambda: sum(backend.batches) >= 11)
    await asyncio.sleep(0.3)
    assert backend.batches == [1, 10]  # the three wait out the interval
    await writer.flush(timeout=5)
    assert backend.batches == [1, 10, 3]
    await writer.close(timeout=5)


async def test_threaded_lane_writes_a_batch_full_by_bytes_without_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch is full at batch_bytes too (big traces: base64 images): waiting cannot make it
    # larger, and waiting the interval between such batches caps what the lane can write.
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = ThreadedBackend()
    records = [
        TraceRecord(id=new_trace_id(), created_at=datetime.now(UTC), step_id=f"s{i}", request_json="x" * 1000)
        for i in range(8)
    ]
    size = record_size(records[0])
    writer = TraceWriter([backend], batch_bytes=3 * size)
    await writer.start()
    writer.enqueue(records[0])
    await _wait_for(lambda: backend.batches == [1])
    for record in records[1:]:  # seven: two batches full by bytes, then one short of full
        writer.enqueue(record)
    await _wait_for(lambda: sum(backend.batches) >= 7)
    await asyncio.sleep(0.3)
    assert backend.batches == [1, 3, 3]  # the last one waits out the interval
    await writer.close(timeout=5)
    assert backend.batches == [1, 3, 3, 1]


async def test_threaded_lane_does_not_wait_with_half_its_queue_bound_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A queue bound below batch_bytes (a small LLMGW_TRACE_QUEUE_BYTES): no batch is ever full
    # by bytes, and waiting the interval with the queue near its bound only drops the oldest.
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = ThreadedBackend()
    records = [
        TraceRecord(id=new_trace_id(), created_at=datetime.now(UTC), step_id=f"s{i}", request_json="x" * 1000)
        for i in range(6)
    ]
    writer = TraceWriter([backend], queue_bytes=4 * record_size(records[0]))
    await writer.start()
    writer.enqueue(records[0])
    await _wait_for(lambda: backend.batches == [1])
    for record in records[1:3]:  # half the bound: written at once
        writer.enqueue(record)
    await _wait_for(lambda: sum(backend.batches) == 3)
    writer.enqueue(records[3])  # one alone waits
    await asyncio.sleep(0.3)
    assert backend.batches == [1, 2]
    await writer.close(timeout=5)
    assert sum(backend.batches) == 4 and writer.stats_for("threaded").dropped == 0


class _ClearHook(threading.Event):
    """A threading.Event that runs `hook` (once) in the thread that first clears it."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[], None] | None = None

    def clear(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        super().clear()


async def test_threaded_lane_a_flush_racing_the_thread_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # A trace queued and a flush() asked for while the thread is about to clear its hurry event
    # (deciding to wait, or finding the queue empty) must still be written at once.
    monkeypatch.setattr(writer_module, "THREAD_WRITE_INTERVAL", 30.0)
    backend = ThreadedBackend()
    writer = TraceWriter([backend])
    lane = writer._lanes[0]
    assert isinstance(lane, writer_module._ThreadedLane)
    hurry = lane.thread_hurry = _ClearHook()
    await writer.start()
    await _wait_for(lambda: lane.sleeping)
    loop = asyncio.get_running_loop()
    flushing: list[asyncio.Task[None]] = []
    flush_asked = threading.Event()

    def enqueue_and_flush() -> None:  # on the loop
        writer.enqueue(make_record(2))
        flushing.append(asyncio.ensure_future(writer.flush(timeout=5)))
        loop.call_soon(flush_asked.set)  # after the flush's first step (it asked the lane)

    def race() -> None:  # in the writer's thread, just before it clears the event
        loop.call_soon_threadsafe(enqueue_and_flush)
        assert flush_asked.wait(5)

    hurry.hook = race
    writer.enqueue(make_record(0))
    await _wait_for(lambda: backend.batches == [1])
    writer.enqueue(make_record(1))  # within the interval: the thread decides to wait
    await _wait_for(lambda: bool(flushing))
    await flushing[0]  # TimeoutError if the flush's request was lost
    assert sum(backend.batches) == 3
    await writer.close(timeout=5)
