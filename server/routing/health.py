"""What routed calls share: cooldowns, keys disabled until reload, per-deployment minute limits.

Units are named by the router: a deployment (`route/name`, plus the organization for BYOK
deployments, whose keys are the tenant's own) or one key of it (`route/name#VARIABLE`). State
is kept by name, so it survives a reload of the routes file; only disabled keys are forgotten.
Every map is bounded: expired entries are dropped when one grows past `MAX_UNITS`.
With Redis (`shared_cooldowns`), `on_cool` sends each lengthened cooldown to the other replicas,
and theirs arrive through `cool(..., share=False)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("llmgateway.routing")

MAX_UNITS = 10_000
WINDOW_SECONDS = 60


class MinuteWindow:
    """Requests and tokens of the last minute in one-second buckets: O(1) memory and time."""

    __slots__ = ("_seconds", "_requests", "_tokens")

    def __init__(self) -> None:
        self._seconds = [-1] * WINDOW_SECONDS
        self._requests = [0] * WINDOW_SECONDS
        self._tokens = [0] * WINDOW_SECONDS

    def _bucket(self, now: float) -> int:
        second = int(now)
        index = second % WINDOW_SECONDS
        if self._seconds[index] != second:
            self._seconds[index] = second
            self._requests[index] = 0
            self._tokens[index] = 0
        return index

    def add(self, now: float, *, requests: int = 0, tokens: int = 0) -> None:
        index = self._bucket(now)
        self._requests[index] += requests
        self._tokens[index] += max(0, tokens)

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now) - WINDOW_SECONDS
        requests = tokens = 0
        for second, r, t in zip(self._seconds, self._requests, self._tokens, strict=True):
            if second > oldest:
                requests += r
                tokens += t
        return requests, tokens

    def frees_at(self, now: float) -> float:
        """When the oldest bucket still counted leaves the window."""
        oldest = int(now) - WINDOW_SECONDS
        live = [
            s
            for s, r, t in zip(self._seconds, self._requests, self._tokens, strict=True)
            if s > oldest and (r or t)
        ]
        return (min(live) + WINDOW_SECONDS) if live else now


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}
        self._disabled: set[str] = set()
        self._windows: dict[str, MinuteWindow] = {}
        self._latest = 0.0  # when the last cooldown recorded ends
        self.on_cool: Callable[[str, float], None] | None = None  # SharedCooldowns.share

    def calm(self) -> bool:
        """Nothing cooling down and nothing disabled: every unit is healthy (the common case)."""
        if self._until and self._latest <= self.clock():
            # Every cooldown is over, also those of units no call here asks about (another
            # replica's BYOK units): the map empties and the fast path is back.
            self._until.clear()
        return not self._until and not self._disabled

    def cooling_until(self, unit: str, now: float | None = None) -> float:
        """The clock time `unit` recovers at (0.0: it is not cooling down). With `now`, an
        expired entry is dropped, so `calm` holds again once every cooldown is over."""
        until = self._until.get(unit)
        if until is None:
            return 0.0
        if now is not None and until <= now:
            del self._until[unit]
            return 0.0
        return until

    def cool(self, unit: str, seconds: float, *, share: bool = True) -> float:
        """Cool `unit` for `seconds` from now; a longer cooldown already running is kept.
        `share`: tell the other replicas (`on_cool`) when this lengthened the cooldown."""
        now = self.clock()
        until = now + max(0.0, seconds)
        current = self._until.get(unit, 0.0)
        if until > current:
            if unit not in self._until and len(self._until) >= MAX_UNITS:
                self._until = {k: v for k, v in self._until.items() if v > now}
                if len(self._until) >= MAX_UNITS:
                    return current  # full of live cooldowns: this one is not recorded (bounded)
            self._until[unit] = until
            self._latest = max(self._latest, until)
            if share and self.on_cool is not None:
                self.on_cool(unit, until - now)
            return until
        return current

    def disabled(self, unit: str) -> bool:
        return unit in self._disabled

    def disable(self, unit: str) -> None:
        if len(self._disabled) < MAX_UNITS:
            self._disabled.add(unit)

    def forget_disabled(self) -> None:
        """On reload: keys disabled for an auth failure are tried again."""
        self._disabled.clear()

    def window(self, unit: str) -> MinuteWindow:
        window = self._windows.get(unit)
        if window is None:
            if len(self._windows) >= MAX_UNITS:
                self._windows.clear()  # limits are per minute: at worst one minute is forgotten
            window = self._windows[unit] = MinuteWindow()
        return window
