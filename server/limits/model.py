"""What a limit is, its fixed UTC windows, and the parsing of limit values.

Windows are fixed, not sliding: a minute is a UTC clock minute, a day a UTC calendar day, a
month a UTC calendar month. A counter starts at 0 at each window's start; up to twice a
per-minute limit can pass across one minute boundary (the price of one counter per window,
which one Redis round trip can check and bump). The time until a window ends is the RetryInfo
of a refusal.

Spend is counted in integer nano-dollars (1e-9 USD; a call's exact pico-dollar cost rounded up),
so a Redis counter (64-bit) holds up to $9.2 billion per window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from server.billing.cost import parse_dollars

Scope = Literal["key", "org"]
METRICS = ("requests_per_minute", "tokens_per_minute", "spend_per_day", "spend_per_month")
PICO_PER_NANO = 1000
MAX_COUNT = 2**53  # requests or tokens per minute: far above any real limit, exact in Lua
MAX_SPEND_NANO = 10**18  # a billion dollars per window


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps of one key or organization; None is no limit. Spend in nano-dollars."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    spend_per_day: int | None = None
    spend_per_month: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.spend_per_day is None
            and self.spend_per_month is None
        )

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None

    @property
    def counts_spend(self) -> bool:
        return self.spend_per_day is not None or self.spend_per_month is not None

    def values(self) -> tuple[int | None, int | None, int | None, int | None]:
        """The four limits in the order of METRICS."""
        return (self.requests_per_minute, self.tokens_per_minute, self.spend_per_day, self.spend_per_month)

    def merged(self, **changes: int | None) -> Limits:
        return replace(self, **changes)


NO_LIMITS = Limits()


def parse_count(text: str, name: str) -> int:
    """A requests or tokens limit: a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if not 0 < value <= MAX_COUNT:
        raise ValueError(f"{name}: {value} is not between 1 and {MAX_COUNT}")
    return value


def parse_spend(text: str, name: str) -> int:
    """A spend limit in dollars ("25.50") as nano-dollars: at least 0, at most 9 fractional digits."""
    try:
        pico = parse_dollars(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if pico < 0 or pico % PICO_PER_NANO:
        raise ValueError(f"{name}: {text!r} is not an amount of dollars >= 0 with at most 9 decimals")
    nano = pico // PICO_PER_NANO
    if nano > MAX_SPEND_NANO:
        raise ValueError(f"{name}: {text!r} is more than a billion dollars")
    return nano


def nano_dollars(pico: int) -> int:
    """A cost in pico-dollars, rounded up to nano-dollars (never under-counted)."""
    return -(-pico // PICO_PER_NANO)


def spend_text(nano: int) -> str:
    """Nano-dollars as a decimal string of dollars ("25.5")."""
    whole, fraction = divmod(nano, 10**9)
    return f"{whole}.{fraction:09d}".rstrip("0").rstrip(".") if fraction else str(whole)


@dataclass(frozen=True, slots=True)
class Window:
    """One fixed window of a metric: its id (part of the counter's key) and when it ends."""

    id: str
    ends: float  # epoch seconds
    ttl: int  # seconds a Redis counter of this window lives (its length and a margin)


def window(metric: str, now: float) -> Window:
    """The window of `metric` that contains `now` (epoch seconds, UTC)."""
    if metric in ("requests_per_minute", "tokens_per_minute"):
        minute = int(now // 60)
        return Window(str(minute), (minute + 1) * 60.0, 120)
    moment = datetime.fromtimestamp(now, UTC)
    if metric == "spend_per_day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(start.strftime("%Y-%m-%d"), start.timestamp() + 86400.0, 2 * 86400)
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if first.month == 12:
        following = first.replace(year=first.year + 1, month=1)
    else:
        following = first.replace(month=first.month + 1)
    return Window(first.strftime("%Y-%m"), following.timestamp(), 32 * 86400)
