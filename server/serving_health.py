"""What the gRPC health service says, and why: the server can do its job, or it cannot.

- NOT_SERVING while the key store cannot be reached and authentication is on: every call would
  fail (it cannot be authenticated), so a load balancer should send calls elsewhere. The store
  is probed every `interval` seconds with a bounded query; SERVING again once it answers.
- NOT_SERVING while shutting down (server/app.py, grpc's `enter_graceful_shutdown`).
- A trace backend that fails is NOT an outage: calls go on and traces wait in its queue (or are
  dropped, counted, by the trace writer). It is a warning, once per failure spell, and a count in
  `COUNTERS`.

`COUNTERS` is a plain per-process object, so a metrics exporter can read it without knowing
this module's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.auth.redact import describe_error
from server.auth.store import AuthStore
from server.traces.writer import TraceWriter

log = logging.getLogger("llmgateway.health")

DEFAULT_INTERVAL = 2.0
PROBE_TIMEOUT = 2.0


@dataclass
class HealthCounters:
    key_store_probe_failures: int = 0  # probes of the key store that failed or timed out
    key_store_outages: int = 0  # times health went NOT_SERVING because of the key store
    # Per trace backend name: times it started failing (a spell of failed writes counts once).
    trace_backend_outages: dict[str, int] = field(default_factory=dict)


COUNTERS = HealthCounters()


class HealthMonitor:
    """Probes the key store (when auth is on) and watches the trace writer's lanes."""

    def __init__(
        self,
        *,
        store: AuthStore,
        auth_required: bool,
        writer: TraceWriter,
        set_serving: Callable[[bool], Awaitable[None]],
        interval: float = DEFAULT_INTERVAL,
        counters: HealthCounters = COUNTERS,
    ) -> None:
        self._store = store
        self._auth_required = auth_required
        self._writer = writer
        self._set_serving = set_serving
        self._interval = interval
        self.counters = counters
        self.serving = True  # what the monitor last decided (shutdown aside)
        self._failing_backends: set[str] = set()
        self._failures = {s.backend: s.failed_batches + s.failed_starts for s in writer.stats}
        self._written = {s.backend: s.written for s in writer.stats}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def check_once(self) -> None:
        if self._auth_required:
            await self._check_key_store()
        self._check_trace_backends()

    async def _check_key_store(self) -> None:
        try:
            await asyncio.wait_for(self._store.has_keys(), PROBE_TIMEOUT)
            reachable, cause = True, ""
        except Exception as exc:  # noqa: BLE001 - any driver error or the timeout: unreachable
            reachable, cause = False, describe_error(exc) or type(exc).__name__
            self.counters.key_store_probe_failures += 1
        if reachable == self.serving:
            return
        self.serving = reachable
        if reachable:
            log.warning("key store reachable again: health SERVING")
        else:
            self.counters.key_store_outages += 1
            log.error("key store unreachable (%s): health NOT_SERVING until it answers", cause)
        await self._set_serving(reachable)

    def _check_trace_backends(self) -> None:
        for stats in self._writer.stats:
            name = stats.backend
            failures = stats.failed_batches + stats.failed_starts
            before = self._failures.get(name, 0)
            self._failures[name] = failures
            wrote = stats.written > self._written.get(name, 0)
            self._written[name] = stats.written
            if failures > before and name not in self._failing_backends:
                self._failing_backends.add(name)
                self.counters.trace_backend_outages[name] = (
                    self.counters.trace_backend_outages.get(name, 0) + 1
                )
                log.warning(
                    "trace backend %s is failing (%d traces queued); calls go on, health stays SERVING",
                    name,
                    stats.queued,
                )
            elif failures == before and wrote and name in self._failing_backends:
                self._failing_backends.discard(name)
                log.warning("trace backend %s is writing again", name)
