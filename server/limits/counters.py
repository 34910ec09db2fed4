"""Limit counters: the interface, and the in-process implementation (one server).

`admit` checks every counter of a call and bumps them all, or none (one refused check refuses
the call); `settle` adds what the call really used minus what admission reserved, later and
without waiting. Redis counters (`redis_counters`) share the same interface across replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ADMITTED = -1
UNCHECKED = -2  # admitted without a check (shared counters unreachable, policy fail open)


@dataclass(frozen=True, slots=True)
class Check:
    """One counter of one call: refused when the counter is at `limit`, or `amount` would pass it."""

    key: str  # "<scope>:<subject>:<metric>:<window id>"
    limit: int
    amount: int
    ttl: int  # seconds a Redis counter of this window lives
    ends: float  # epoch seconds when the window ends


class Counters(Protocol):
    round_trips: int  # Redis commands sent (pipelines count one); 0 in-process

    async def admit(self, checks: Sequence[Check], now: float) -> int:
        """ADMITTED when every check passed (and all were bumped), UNCHECKED when the counters
        could not be reached and the policy admits, else the index of the first refused check."""
        ...

    def settle(self, key: str, delta: int, ttl: int) -> None:
        """Add `delta` (may be negative) to a counter admitted before; never blocks."""
        ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in this process: exact and atomic (the event loop runs one admit at a time).

    One entry per counter of a window; the entries of windows that ended are dropped whenever
    the table has grown by `prune_every` entries since the last sweep, so it holds the live
    windows of the keys with limits (four at most per key and organization) plus that slack.
    """

    round_trips = 0

    def __init__(self, *, prune_every: int = 10_000) -> None:
        self._values: dict[str, list[float]] = {}  # key -> [value, window end]
        self._prune_every = prune_every
        self._prune_at = prune_every

    async def admit(self, checks: Sequence[Check], now: float) -> int:
        return self.admit_now(checks, now)

    def admit_now(self, checks: Sequence[Check], now: float) -> int:
        values = self._values
        for index, check in enumerate(checks):
            entry = values.get(check.key)
            current = entry[0] if entry is not None else 0
            if current >= check.limit or current + check.amount > check.limit:
                return index
        for check in checks:
            entry = values.get(check.key)
            if entry is None:
                values[check.key] = [check.amount, check.ends]
            else:
                entry[0] += check.amount
        if len(values) >= self._prune_at:
            self._prune(now)
        return ADMITTED

    def settle(self, key: str, delta: int, ttl: int) -> None:
        entry = self._values.get(key)
        if entry is not None:  # a window already swept is over: nothing left to correct
            entry[0] += delta

    def value(self, key: str) -> int:
        entry = self._values.get(key)
        return int(entry[0]) if entry is not None else 0

    def _prune(self, now: float) -> None:
        self._values = {key: entry for key, entry in self._values.items() if entry[1] > now}
        self._prune_at = len(self._values) + self._prune_every

    async def close(self) -> None:
        return None
