"""`LLMGW_TRACE_RETENTION`: deletes traces older than the retention, off the request path.

A background task of each server process. Every `interval` seconds (and once soon after
start-up) it asks each trace backend to delete, in batches of `batch` traces with a pause
between them, the traces created before now - retention: a long backlog (the first run on a
store that grew for months) never holds the SQLite file or a Postgres table in one long
transaction, and the trace writer gets its turn between batches. Several workers prune the same
store harmlessly (deletes of rows already deleted find nothing). ClickHouse expires rows with a
table TTL instead (`apply_retention`), the socket stores nothing.

A failure (the store is down) is logged and retried at the next interval; it never touches a
call. Each backend's totals are in `deleted` (by backend name), for tests and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from server.auth.redact import describe_error
from server.traces.base import TraceBackend

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 600.0
DEFAULT_BATCH = 1000
# Between two batches: lets writes (and other workers' prunes) through.
BATCH_PAUSE = 0.05
# After start-up, before the first run: start-up itself is not slowed.
FIRST_RUN_DELAY = 1.0


class RetentionPruner:
    def __init__(
        self,
        backends: Sequence[TraceBackend],
        retention: float,
        *,
        interval: float = DEFAULT_INTERVAL,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self.backends = list(backends)
        self.retention = retention
        self.interval = interval
        self.batch = batch
        self.deleted: dict[str, int] = {b.name: 0 for b in self.backends}
        self.runs = 0  # completed passes over every backend
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Prepare each backend (index, TTL) and start the background task."""
        for backend in self.backends:
            try:
                await backend.apply_retention(self.retention)
            except Exception as exc:  # noqa: BLE001 - a store that is down: pruning still runs later
                log.warning("trace retention on %s not applied: %s", backend.name, describe_error(exc))
        self._task = asyncio.create_task(self._loop(), name="trace-retention")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        await asyncio.sleep(FIRST_RUN_DELAY)
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    async def run_once(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention)
        for backend in self.backends:
            total = 0
            try:
                while True:
                    count = await backend.prune(before=cutoff, limit=self.batch)
                    total += count
                    if count < self.batch:
                        break
                    await asyncio.sleep(BATCH_PAUSE)
            except Exception as exc:  # noqa: BLE001 - logged; the next run tries again
                log.warning("trace retention: pruning %s failed: %s", backend.name, describe_error(exc))
            self.deleted[backend.name] += total
            if total:
                log.info(
                    "trace retention: deleted %d traces older than %s from %s", total, cutoff, backend.name
                )
        self.runs += 1
