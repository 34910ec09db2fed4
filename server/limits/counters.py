"""Limit counters: the interface, and the in-process implementation (one server).

`admit` checks every counter of a call and bumps them all, or none (one refused check refuses
the call); `settle` adds what the call really used minus what admission reserved, later and
without waiting. Redis counters (`redis_counters`) share the same interface across replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

ADMITTED = -1
UNCHECKED = -2  # admitted without a check (shared counters unreachable, policy fail open)


# One counter of one call: (key "<scope>:<subject>:<metric>:<window id>", limit, amount, ttl
# in seconds of a Redis counter of this window, epoch seconds when the window ends). Refused when
# the counter is at its limit, or the amount would pass it. A plain tuple: up to eight are built
# per call, on the request path.
Check = tuple[str, int, int, int, float]
# A check as a limiter's cached plan holds it (`MemoryCounters.admit_rows`): the amount is
# `amounts[which]` of the call's amounts, so the rows are built once per minute, not per call:
# (key, limit, which, ttl, window end).
Row = tuple[str, int, int, int, float]


class Counters(Protocol):
    round_trips: int  # Redis commands sent (pipelines count one); 0 in-process

    async def admit(self, checks: Sequence[Check], now: float) -> int:
        """ADMITTED when every check passed (and all were bumped), UNCHECKED when the counters
        could not be reached and the policy admits, else the index of the first refused check."""
        ...

    def settle(self, key: str, delta: int, ttl: int) -> None:
        """Add `delta` (may be negative) to a counter admitted before; never blocks."""
        ...

    def settle_all(self, counters: Sequence[tuple[str, int]], delta: int) -> None:
        """`settle(key, delta, ttl)` of each (key, ttl) of `counters`."""
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
        entries = []
        for index, (key, limit, amount, _, _) in enumerate(checks):
            entry = values.get(key)
            current = entry[0] if entry is not None else 0
            if current >= limit or current + amount > limit:
                return index
            entries.append(entry)
        for entry, (key, _, amount, _, ends) in zip(entries, checks, strict=True):
            if entry is None:
                values[key] = [amount, ends]
            else:
                entry[0] += amount
        if len(values) >= self._prune_at:
            self._prune(now)
        return ADMITTED

    def admit_rows(self, rows: Sequence[Row], amounts: Sequence[int], now: float) -> int:
        """`admit_now` of the checks (key, limit, amounts[which], ttl, end) of `rows`: the same
        outcome and the same table after it, with no tuple built per call (the limiter's
        in-process path).

        One pass that bumps each counter as it checks it and, if a later one refuses, takes the
        bumps back and drops the counters it created (all or nothing as `admit_now`: nothing else
        runs in between). Dropping them matters: a refused call never sweeps the table, so the
        counters of every key refused by its organization, minute after minute, would pile up
        for as long as nothing is admitted. The admitted call, the common one, walks its
        counters once; only the first call of a window records what it created."""
        values = self._values
        index = 0
        created: list[str] | None = None  # counters this call created (once per window)
        for key, limit, which, _, ends in rows:
            amount = amounts[which]
            entry = values.get(key)
            if entry is None:
                if 0 >= limit or amount > limit:
                    self._take_back(rows, amounts, index, created)
                    return index
                values[key] = [amount, ends]
                if created is None:
                    created = [key]
                else:
                    created.append(key)
            else:
                current = entry[0]
                if current >= limit or current + amount > limit:
                    self._take_back(rows, amounts, index, created)
                    return index
                entry[0] = current + amount
            index += 1
        if len(values) >= self._prune_at:
            self._prune(now)
        return ADMITTED

    def _take_back(
        self, rows: Sequence[Row], amounts: Sequence[int], count: int, created: list[str] | None
    ) -> None:
        """Undo the bumps of the first `count` rows (a later row refused the call) and remove
        the counters it created."""
        values = self._values
        for key, _, which, _, _ in rows[:count]:
            values[key][0] -= amounts[which]
        if created is not None:
            for key in created:
                del values[key]

    def settle_all(self, counters: Sequence[tuple[str, int]], delta: int) -> None:
        """`settle(key, delta, ttl)` of each (key, ttl)."""
        values = self._values
        for key, _ in counters:
            entry = values.get(key)
            if entry is not None:
                entry[0] += delta

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
