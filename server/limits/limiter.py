"""The request path of limits: admit a call before anything goes upstream, settle it after.

Admission reserves, on every limit of the caller's key and of its organization at once (all or
nothing): 1 request; the prompt's counted tokens (message texts) plus `max_tokens` when set;
and the cost of those tokens at the model's input and output prices. A limit at or past its
value, or one the reservation would pass, refuses the call with RESOURCE_EXHAUSTED
QUOTA_EXCEEDED, a `QuotaFailure` naming the limit and a `RetryInfo` with the time until its
window ends; nothing is sent upstream.

Settling replaces the reservation with what the call used (the reported total tokens, the
exact cost rounded up to a nano-dollar); a failed call used nothing (its request still counts).
Settles go to the windows the call was admitted in, so a call admitted at 23:59:59 UTC counts
in that day.

Spend limits need a price: a call to a model with no price under a spend limit is refused with
FAILED_PRECONDITION (its cost could not be checked), so an unpriced model is no way around a
budget; price it (even at 0) with LLMGW_PRICES_FILE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.billing.cost import parse_dollars
from server.billing.prices import PriceTable
from server.core import tokens
from server.errors import FailedPrecondition, QuotaExceeded
from server.limits.book import LimitsBook
from server.limits.counters import UNCHECKED, Check, Counters
from server.limits.model import Limits, Scope, nano_dollars, spend_text, window

_RATE_METRICS = ("requests_per_minute", "tokens_per_minute")


@dataclass(slots=True)
class _Reserved:
    key: str
    ttl: int
    tokens: bool  # True: a token counter; False: a spend counter
    amount: int


class Ticket:
    """One admitted call: what it reserved, corrected by `settle` (once)."""

    __slots__ = ("_counters", "_reserved", "_unchecked", "_settled")

    def __init__(self, counters: Counters, reserved: list[_Reserved], unchecked: bool) -> None:
        self._counters = counters
        self._reserved = reserved
        self._unchecked = unchecked
        self._settled = False

    def settle(self, usage: chat_pb2.Usage | None) -> None:
        """Replace the reservation with the usage (None: the call failed, it used nothing)."""
        if self._settled:
            return
        self._settled = True
        used_tokens = max(0, usage.total_tokens) if usage is not None else 0
        used_spend = 0
        if usage is not None and usage.cost_usd:
            used_spend = max(0, nano_dollars(parse_dollars(usage.cost_usd)))
        for reserved in self._reserved:
            used = used_tokens if reserved.tokens else used_spend
            # Admitted unchecked (Redis was away): nothing was reserved, the whole usage counts.
            delta = used if self._unchecked else used - reserved.amount
            self._counters.settle(reserved.key, delta, reserved.ttl)


class Limiter:
    def __init__(
        self,
        book: LimitsBook,
        counters: Counters,
        prices: PriceTable,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book = book
        self.counters = counters
        self._prices = prices
        self.clock = clock  # epoch seconds; tests move it (a day's end, a minute's)

    def may_apply(self, actor: Actor) -> bool:
        """False only when the cache knows that neither the key nor its organization has limits
        (then a call needs no admission at all: no await, no counting)."""
        book = self.book
        org = book.cached("org", actor.organization_id)
        if org is None or not org.empty:
            return True
        if not actor.key_id:
            return False
        key = book.cached("key", actor.key_id)
        return key is None or not key.empty

    async def admit(self, actor: Actor, request: chat_pb2.CreateRequest) -> Ticket | None:
        """Reserve the call on every limit that applies; None when none does."""
        subjects: list[tuple[Scope, str, Limits]] = []
        if actor.key_id:
            key_limits = await self.book.get("key", actor.key_id)
            if not key_limits.empty:
                subjects.append(("key", actor.key_id, key_limits))
        org_limits = await self.book.get("org", actor.organization_id)
        if not org_limits.empty:
            subjects.append(("org", actor.organization_id, org_limits))
        if not subjects:
            return None
        config = request.llm_config
        estimate_tokens = 0
        estimate_spend = 0
        if any(limits.counts_tokens or limits.counts_spend for _, _, limits in subjects):
            prompt = await _prompt_tokens(request)
            answer = max(0, config.max_tokens) if config.HasField("max_tokens") else 0
            estimate_tokens = prompt + answer
            if any(limits.counts_spend for _, _, limits in subjects):
                price = self._prices.find(config.model_endpoint_type, config.model)
                if price is None:
                    raise FailedPrecondition(
                        f"model {config.model!r} has no price, so its cost cannot be checked against the "
                        "spend limit; give it one in LLMGW_PRICES_FILE",
                        metadata={"model": config.model, "model_endpoint_type": config.model_endpoint_type},
                    )
                rates = price.rates_for(prompt)
                estimate_spend = nano_dollars(prompt * rates.input + answer * rates.output)
        now = self.clock()
        checks: list[Check] = []
        names: list[tuple[Scope, str, str, int, float]] = []
        reserved: list[_Reserved] = []
        for scope, subject, limits in subjects:
            for metric, limit, amount in (
                ("requests_per_minute", limits.requests_per_minute, 1),
                ("tokens_per_minute", limits.tokens_per_minute, estimate_tokens),
                ("spend_per_day", limits.spend_per_day, estimate_spend),
                ("spend_per_month", limits.spend_per_month, estimate_spend),
            ):
                if limit is None:
                    continue
                w = window(metric, now)
                key = f"{scope}:{subject}:{metric}:{w.id}"
                checks.append(Check(key, limit, amount, w.ttl, w.ends))
                names.append((scope, subject, metric, limit, w.ends))
                if metric != "requests_per_minute":
                    reserved.append(_Reserved(key, w.ttl, metric == "tokens_per_minute", amount))
        outcome = await self.counters.admit(checks, now)
        if outcome >= 0:
            raise _refusal(*names[outcome], amount=checks[outcome].amount, now=now)
        return Ticket(self.counters, reserved, unchecked=outcome == UNCHECKED)


async def _prompt_tokens(request: chat_pb2.CreateRequest) -> int:
    """The prompt's tokens as admission counts them: the message texts (tool calls and
    functions are left to the settled usage)."""
    messages = [{"role": "user", "content": m.content} for m in request.messages if m.content]
    if not messages:
        return 0
    count = await tokens.count_request_tokens_async(messages, None, request.llm_config.model)
    return count.prompt_tokens


def _refusal(
    scope: Scope, subject: str, metric: str, limit: int, ends: float, *, amount: int, now: float
) -> QuotaExceeded:
    shown = spend_text(limit) if metric.startswith("spend") else str(limit)
    unit = " USD" if metric.startswith("spend") else ""
    owner = "key" if scope == "key" else "organization"
    wait = max(0.0, ends - now)
    message = f"the {owner}'s limit {metric} ({shown}{unit}) is reached; it frees in {math.ceil(wait)} s"
    if not metric.startswith("requests") and amount > limit:
        message = f"this call alone needs more than the {owner}'s limit {metric} ({shown}{unit})"
    return QuotaExceeded(
        message,
        metadata={
            "scope": scope,
            "subject": subject,
            "limit": metric,
            "value": shown,
            "retry_after_s": math.ceil(wait),
        },
        retry_delay=wait,
        quota_violations=[(f"{scope}:{subject}:{metric}", message)],
    )
