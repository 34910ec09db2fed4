"""The request path of limits: admit a call before anything goes upstream, settle it after.

Admission comes after validation and the context-window guard, before anything is sent. It
reserves, on every limit of the caller's key and of its organization at once (all or nothing):
1 request; the prompt's tokens (the guard's count, prompt and functions; without a context
window the guard counts nothing and admission estimates the message texts, see
`estimate_prompt_tokens`) plus `max_tokens` when set; and the cost of those tokens at the
model's input and output prices. A limit at or past its
value, or one the reservation would pass, refuses the call with RESOURCE_EXHAUSTED
QUOTA_EXCEEDED, a `QuotaFailure` naming the limit and a `RetryInfo` with the time until its
window ends; nothing is sent upstream.

Settling replaces the reservation with what the call used (the reported total tokens, the
exact cost rounded up to a nano-dollar); a call the upstream refused used nothing (its request
still counts). A call that ended unfinished after its request went upstream (the client
cancelled, its deadline passed, the stream was cut) may have been billed without a usage coming
back: it keeps its prompt, and counts as its answer what it relayed (a stream: its text at 4
characters a token) or, with nothing relayed, what it reserved (`max_tokens`).
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

from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.billing.cost import parse_dollars
from server.billing.prices import PriceTable, Rates
from server.core import tokens
from server.errors import FailedPrecondition, QuotaExceeded
from server.limits.book import LimitsBook
from server.limits.counters import UNCHECKED, Counters, MemoryCounters, Row
from server.limits.model import NO_LIMITS, Limits, Scope, Window, nano_dollars, spend_text, window

_METRICS = ("requests_per_minute", "tokens_per_minute", "spend_per_day", "spend_per_month")
# Callers (key, organization) with a cached plan; cleared past it. A plan with 8 limits is ~2 KiB:
# 25,000 keeps the cache near 60 MB at worst (a rebuild costs a few microseconds).
_MAX_PLANS = 25_000


class _Plan:
    """The counters one caller (a key and its organization) touches in one set of windows, with
    everything admission and settling need but the amounts: built when the minute or either's
    Limits change (the book hands out the same Limits object while it is cached), so a call
    builds no counter key and no tuple per counter of its own."""

    __slots__ = ("windows", "key_limits", "org_limits", "rows", "owners", "counts_tokens", "counts_spend",
                 "tokens", "spend")  # fmt: skip

    def __init__(
        self,
        windows: tuple[Window, ...],
        subjects: tuple[tuple[Scope, str, Limits], ...],
        key: Limits,
        org: Limits,
    ) -> None:
        self.windows = windows
        self.key_limits = key
        self.org_limits = org
        rows: list[Row] = []
        owners: list[tuple[Scope, str, int]] = []
        for scope, subject, limits in subjects:  # the key's counters first, then the org's
            for index, limit in enumerate(limits.values()):
                if limit is not None:
                    span = windows[index]
                    rows.append(
                        (f"{scope}:{subject}:{_METRICS[index]}:{span.id}", limit, index, span.ttl, span.ends)
                    )
                    owners.append((scope, subject, index))
        # (counter key, limit, index of its amount in (requests, tokens, spend, spend), ttl, end)
        self.rows = tuple(rows)
        self.owners = tuple(owners)  # of each row: whose, which metric
        self.counts_tokens = key.counts_tokens or org.counts_tokens
        self.counts_spend = key.counts_spend or org.counts_spend
        # What settling corrects: (counter key, ttl) of the token and of the spend counters.
        self.tokens = tuple((row[0], row[3]) for row in rows if row[2] == 1)
        self.spend = tuple((row[0], row[3]) for row in rows if row[2] >= 2)


class Ticket:
    """One admitted call: what it reserved, corrected by `settle` (once)."""

    __slots__ = ("_counters", "_plan", "_tokens", "_spend", "_unchecked", "_settled", "_prompt", "_answer",
                 "_rates")  # fmt: skip

    def __init__(
        self,
        counters: Counters,
        plan: _Plan,
        unchecked: bool,
        tokens: int,
        spend: int,
        prompt: int,
        answer: int,
        rates: Rates | None,
    ) -> None:
        self._counters = counters
        self._plan = plan  # the counters of the windows it was admitted in (settled there)
        self._tokens = tokens  # reserved on each token counter
        self._spend = spend  # reserved on each spend counter
        self._unchecked = unchecked
        self._settled = False
        self._prompt = prompt  # what admission reserved: the prompt's tokens, max_tokens
        self._answer = answer
        self._rates = rates  # the model's prices when a spend limit applies

    def settle_unfinished(self, answer_tokens: int | None) -> None:
        """The call ended without a usage after its request went upstream (cancelled, timed
        out, cut): the upstream may have billed it, so it keeps its prompt and counts
        `answer_tokens` (what it relayed; None: what it reserved) as its answer."""
        if self._settled:
            return
        answer = self._answer if answer_tokens is None else max(0, answer_tokens)
        rates = self._rates
        spend = nano_dollars(self._prompt * rates.input + answer * rates.output) if rates is not None else 0
        self._settle(self._prompt + answer, spend)

    def settle(self, usage: chat_pb2.Usage | None) -> None:
        """Replace the reservation with the usage (None: the call failed, it used nothing)."""
        if self._settled:
            return
        used_tokens = used_spend = 0
        if usage is not None:
            used_tokens = max(0, usage.total_tokens)
            if self._plan.spend:  # the cost is parsed only when a spend counter needs it
                cost = usage.cost_usd
                if cost:
                    used_spend = max(0, nano_dollars(parse_dollars(cost)))
        self._settle(used_tokens, used_spend)

    def _settle(self, used_tokens: int, used_spend: int) -> None:
        self._settled = True
        plan = self._plan
        # Admitted unchecked (Redis was away): nothing was reserved, the whole usage counts.
        # A correction of 0 changes no counter: not sent.
        if plan.tokens:
            delta = used_tokens if self._unchecked else used_tokens - self._tokens
            if delta:
                self._counters.settle_all(plan.tokens, delta)
        if plan.spend:
            delta = used_spend if self._unchecked else used_spend - self._spend
            if delta:
                self._counters.settle_all(plan.spend, delta)


class Admission:
    """One call's way through the limits: `admit` once its prompt is counted, before anything
    goes upstream (QUOTA_EXCEEDED there); `settle` when it ended, however it ended."""

    __slots__ = ("_limiter", "_actor", "_request", "_ticket", "_admitted")

    def __init__(self, limiter: Limiter, actor: Actor, request: chat_pb2.CreateRequest) -> None:
        self._limiter = limiter
        self._actor = actor
        self._request = request
        self._ticket: Ticket | None = None
        self._admitted = False

    async def admit(self, count: tokens.TokenCount | None) -> None:
        """Once per call: a routed call's later attempts (fallbacks) are the same call."""
        if self._admitted:
            return
        prompt = count.total_tokens if count is not None else None
        self._ticket = await self._limiter.admit(self._actor, self._request, prompt_tokens=prompt)
        self._admitted = True  # only once admitted: a refusal is never skipped by a later attempt

    def settle(self, usage: chat_pb2.Usage | None) -> None:
        if self._ticket is not None:
            self._ticket.settle(usage)

    def settle_unfinished(self, answer_tokens: int | None) -> None:
        """See `Ticket.settle_unfinished`; the settle that follows is then a no-op."""
        if self._ticket is not None:
            self._ticket.settle_unfinished(answer_tokens)


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
        self._window_cache: tuple[float, tuple[Window, ...]] = (0.0, (Window("", 0.0, 0),))
        self._plans: dict[tuple[str, str], _Plan] = {}  # by (key id, organization id)

    def may_apply(self, actor: Actor) -> bool:
        """False only when the cache knows that neither the key nor its organization has limits
        (then a call needs no admission at all: no await, no counting)."""
        return not self.book.known_unlimited(actor.key_id, actor.organization_id)

    def _windows(self, now: float) -> tuple[Window, ...]:
        """The four metrics' windows at `now`, reused until the minute ends (a day's and a
        month's boundaries are minute boundaries too); recomputed if the clock goes back."""
        start, windows = self._window_cache
        if not start <= now < windows[0].ends:
            windows = tuple(window(metric, now) for metric in _METRICS)
            self._window_cache = (windows[0].ends - 60.0, windows)
        return windows

    def admission(self, actor: Actor, request: chat_pb2.CreateRequest) -> Admission:
        return Admission(self, actor, request)

    async def admit(
        self, actor: Actor, request: chat_pb2.CreateRequest, *, prompt_tokens: int | None = None
    ) -> Ticket | None:
        """Reserve the call on every limit that applies; None when none does. `prompt_tokens`:
        the guard's count when it made one (else the message texts are counted here)."""
        book = self.book
        key_id, org_id = actor.key_id, actor.organization_id
        key_limits = NO_LIMITS
        if key_id:
            cached = book.cached("key", key_id)
            key_limits = cached if cached is not None else await book.get("key", key_id)
        org_limits = book.cached("org", org_id)
        if org_limits is None:
            org_limits = await book.get("org", org_id)
        if key_limits.empty and org_limits.empty:
            return None
        now = self.clock()
        windows = self._windows(now)
        plan = self._plans.get((key_id, org_id))
        if plan is None or plan.windows is not windows or plan.key_limits is not key_limits or (
            plan.org_limits is not org_limits
        ):  # fmt: skip
            plan = self._plan(key_id, key_limits, org_id, org_limits, windows)
        estimate_tokens = estimate_spend = prompt = answer = 0
        rates = None
        if plan.counts_tokens or plan.counts_spend:
            config = request.llm_config
            prompt = prompt_tokens if prompt_tokens is not None else estimate_prompt_tokens(request)
            answer = config.max_tokens  # 0 when not set (an optional field's default)
            if answer < 0:
                answer = 0
            estimate_tokens = prompt + answer
            if plan.counts_spend:
                rates = self._rates(config, prompt)
                estimate_spend = nano_dollars(prompt * rates.input + answer * rates.output)
        amounts = (1, estimate_tokens, estimate_spend, estimate_spend)
        counters = self.counters
        if isinstance(counters, MemoryCounters):  # in-process: no checks to build, no coroutine
            outcome = counters.admit_rows(plan.rows, amounts, now)
        else:
            checks = [(key, limit, amounts[which], ttl, ends) for key, limit, which, ttl, ends in plan.rows]
            outcome = await counters.admit(checks, now)
        if outcome >= 0:
            scope, subject, index = plan.owners[outcome]
            _, limit, which, _, ends = plan.rows[outcome]
            raise _refusal(scope, subject, _METRICS[index], limit, ends, amount=amounts[which], now=now)
        return Ticket(
            counters, plan, outcome == UNCHECKED, estimate_tokens, estimate_spend, prompt, answer, rates
        )

    def _rates(self, config: chat_pb2.LLMConfig, prompt: int) -> Rates:
        price = self._prices.find(config.model_endpoint_type, config.model)
        if price is None:
            raise FailedPrecondition(
                f"model {config.model!r} has no price, so its cost cannot be checked against the "
                "spend limit; give it one in LLMGW_PRICES_FILE",
                metadata={"model": config.model, "model_endpoint_type": config.model_endpoint_type},
            )
        return price.rates_for(prompt)

    def _plan(
        self, key_id: str, key_limits: Limits, org_id: str, org_limits: Limits, windows: tuple[Window, ...]
    ) -> _Plan:
        """A caller's plan, built once per minute and limits (see `_Plan`)."""
        subjects: list[tuple[Scope, str, Limits]] = []
        if not key_limits.empty:
            subjects.append(("key", key_id, key_limits))
        if not org_limits.empty:
            subjects.append(("org", org_id, org_limits))
        plan = _Plan(windows, tuple(subjects), key_limits, org_limits)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[(key_id, org_id)] = plan
        return plan


def estimate_prompt_tokens(request: chat_pb2.CreateRequest) -> int:
    """The prompt's tokens as admission reserves them when the guard counted nothing (no
    context window): an estimate, not a count (counting cost ~6 us of the 15 us budget).

    ASCII text at 4 characters a token; other text adds 1 token per 2 UTF-8 bytes beyond the
    first of each character; 4 tokens per message and 3 for the reply's framing. Measured
    against tiktoken (o200k / cl100k): English 1.14x, French 1.09x / 0.91x, Chinese 1.95x /
    0.89x, Russian 2.15x / 1.25x, emoji 1.1x / 0.63x, code 0.62x, digits 0.67x, base64 0.36-0.40x
    of the exact count. Only the message texts: tool calls and functions are left out. It only
    decides whether the call is admitted: settling replaces it with the usage the upstream
    reports, so a window is never left holding the estimate (a call admitted on too low an
    estimate passes a limit by at most its own prompt, as an answer's unknown length does).
    """
    total = 3
    for message in request.messages:
        text = message.content
        total += 4
        if text:
            if text.isascii():
                total += (len(text) + 3) // 4
            else:
                chars = len(text)
                total += (chars + 3) // 4 + (len(text.encode("utf-8")) - chars + 1) // 2
    return total


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
