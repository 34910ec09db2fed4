"""The usage query (UsageService.GetUsage) shared by the readable trace backends.

Each backend sums in its own SQL, grouped by any of day (UTC), model, key and user: requests,
errors, tokens by kind, exact cost (SQLite: the decimal text split into integer parts; PostgreSQL
numeric; ClickHouse Decimal) and the successful calls whose cost is unknown (`unpriced`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

GROUPS = ("day", "model", "key_id", "user_id")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    organization_id: str
    start_time: datetime
    end_time: datetime
    group_by: tuple[str, ...] = ()  # a subset of GROUPS, in this order
    owner: str | None = None  # as in TraceQuery: None reads the whole organization
    model: str = ""
    user_id: str = ""
    key_id: str = ""

    def filters(self) -> list[tuple[str, str]]:
        """(column, value) of each filter that is set."""
        pairs = [("model", self.model), ("user_id", self.user_id), ("key_id", self.key_id)]
        owner = [("owner", self.owner)] if self.owner is not None else []
        return owner + [(column, value) for column, value in pairs if value]


@dataclass(slots=True)
class UsageTotals:
    day: str = ""
    model: str = ""
    key_id: str = ""
    user_id: str = ""
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico: int = 0
    unpriced: int = 0


SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def totals_from(groups: dict[str, str], counts: list[int], cost_pico: int) -> UsageTotals:
    """A row from its group values, [requests, errors, *SUMMED, unpriced] and its cost."""
    requests, errors, *summed, unpriced = counts
    row = UsageTotals(requests=int(requests), errors=int(errors), unpriced=int(unpriced), cost_pico=cost_pico)
    for name, value in zip(SUMMED, summed, strict=True):
        setattr(row, name, int(value or 0))
    for name, text in groups.items():
        setattr(row, name, text)
    return row
