"""Prices each finished call: its cost onto the answer's Usage and the trace, and the counters.

A model with no price is "unpriced": the answer's `cost_usd` stays empty and the trace's cost
NULL (never 0), `unpriced` counts it, and a warning is logged once per (provider, model).
Both go to /metrics: `llmgw_cost_usd_total` (the exact sum) and `llmgw_unpriced_calls_total`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmgateway.v1 import chat_pb2

from server import metrics
from server.billing.cost import cost_of, dollars
from server.billing.prices import PriceTable

log = logging.getLogger("llmgateway.billing")
_MAX_MODELS = 1024  # distinct (provider, model) counters kept; model names come from callers


@dataclass(slots=True)
class ModelTotals:
    """What one (provider, model) cost this process, for the metrics."""

    priced: int = 0
    unpriced: int = 0
    cost_pico: int = 0


@dataclass(slots=True)
class Meter:
    """The price table and the process's cost counters."""

    table: PriceTable
    totals: dict[tuple[str, str], ModelTotals] = field(default_factory=dict)
    unpriced: int = 0  # calls of a model with no price (or inconsistent usage), all models

    def price(self, provider: str, model: str, usage: chat_pb2.Usage) -> int | None:
        """Sets `usage.cost_usd`; returns the cost in pico-dollars, None when unpriced."""
        price = self.table.find(provider, model)
        cost = None
        if price is not None:
            cost = cost_of(
                price,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
                usage.cache_write_tokens,
                usage.cache_write_1h_tokens,
                usage.reasoning_tokens,
            )
        totals = self.totals.get((provider, model))
        if totals is None:
            totals = self._totals(provider, model)
        if cost is None:
            self.unpriced += 1
            metrics.record_unpriced(provider, model)
            if totals is not None and totals.unpriced == 0:
                why = "has no price" if price is None else "reported usage whose parts do not add up"
                log.warning("%s model %r %s: its calls are recorded as unpriced", provider, model, why)
            if totals is not None:
                totals.unpriced += 1
            usage.cost_usd = ""
            return None
        if totals is not None:
            totals.priced += 1
            totals.cost_pico += cost
        metrics.record_cost(provider, model, cost)
        usage.cost_usd = dollars(cost)
        return cost

    def _totals(self, provider: str, model: str) -> ModelTotals | None:
        key = (provider, model)
        totals = self.totals.get(key)
        if totals is None:
            if len(self.totals) >= _MAX_MODELS:
                key = (provider, "(other)")
                totals = self.totals.get(key)
                if totals is not None:
                    return totals
            totals = self.totals[key] = ModelTotals()
        return totals
