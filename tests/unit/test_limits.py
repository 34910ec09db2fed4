"""The limiter's request path in-process: reservations, settles, windows and the caches behind
them (the per-subject counter keys, reused while the limits and the minute stay the same)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.billing.meter import Meter
from server.billing.prices import PriceTable
from server.errors import FailedPrecondition, QuotaExceeded
from server.limits.book import LimitsBook
from server.limits.counters import ADMITTED, UNCHECKED, Check, MemoryCounters
from server.limits.limiter import Limiter, estimate_prompt_tokens
from server.limits.model import Limits, nano_dollars

NOON = datetime(2026, 3, 14, 12, 0, 30, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 3, 15, tzinfo=UTC).timestamp()
ACTOR = Actor(organization_id="acme", key_id="k1")
ALL = Limits(requests_per_minute=100, tokens_per_minute=10**6, spend_per_day=10**12, spend_per_month=10**12)


class FakeStore:
    """What LimitsBook needs of an AuthStore: limits by (scope, subject)."""

    cache_ttl = 5.0

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[int | None, ...]] = {}
        self.fetches = 0

    async def _fetch_limits(self, *, scope: str, subject: str) -> tuple[int | None, ...] | None:
        self.fetches += 1
        return self.rows.get((scope, subject))

    async def _upsert_limits(self, *, scope: str, subject: str, values: tuple[int | None, ...]) -> None:
        self.rows[(scope, subject)] = values


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingCounters:
    """Counters without `admit_now` (as Redis's): records what the limiter hands them."""

    round_trips = 0

    def __init__(self, outcome: int = ADMITTED) -> None:
        self.outcome = outcome
        self.admits: list[tuple[list[Check], float]] = []
        self.settles: list[tuple[str, int, int]] = []

    async def admit(self, checks: Sequence[Check], now: float) -> int:
        self.admits.append((list(checks), now))
        return self.outcome

    def settle(self, key: str, delta: int, ttl: int) -> None:
        self.settles.append((key, delta, ttl))

    def settle_all(self, counters: Sequence[tuple[str, int]], delta: int) -> None:
        for key, ttl in counters:
            self.settle(key, delta, ttl)

    async def close(self) -> None:
        return None


def request(*, max_tokens: int | None = None, model: str = "gpt-4o-mini") -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(model=model, model_endpoint_type="openai")
    if max_tokens is not None:
        config.max_tokens = max_tokens
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are terse."),  # 14 chars
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hello there"),  # 11 chars
        ],
    )


def usage(total: int, cost: str = "") -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=total - 5, completion_tokens=5, total_tokens=total, cost_usd=cost)


async def limiter_with(
    key: Limits | None = ALL, org: Limits | None = ALL, *, counters: object = None, now: float = NOON
) -> tuple[Limiter, FakeStore, Clock]:
    store = FakeStore()
    book = LimitsBook(store, cache_ttl=3600.0)  # type: ignore[arg-type]
    if key is not None:
        await book.set("key", ACTOR.key_id, key)
    if org is not None:
        await book.set("org", ACTOR.organization_id, org)
    clock = Clock(now)
    limiter = Limiter(book, counters or MemoryCounters(), PriceTable.load(), clock=clock)  # type: ignore[arg-type]
    return limiter, store, clock


def minute_of(now: float) -> int:
    return int(now // 60)


def value(limiter: Limiter, name: str) -> int:
    counters = limiter.counters
    assert isinstance(counters, MemoryCounters)
    return counters.value(name)


def spend_of(prompt: int, answer: int) -> int:
    price = PriceTable.load().find("openai", "gpt-4o-mini")
    assert price is not None
    return nano_dollars(prompt * price.rates.input + answer * price.rates.output)


def test_estimate_prompt_tokens() -> None:
    # 3 for the reply, 4 per message, ASCII at 4 characters a token (rounded up).
    assert estimate_prompt_tokens(request()) == 3 + 4 + 4 + 4 + 3
    text = "日本語"  # 3 characters, 9 UTF-8 bytes: 1 + (9 - 3 + 1) // 2
    one = chat_pb2.CreateRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=text)])
    assert estimate_prompt_tokens(one) == 3 + 4 + 1 + 3
    assert estimate_prompt_tokens(chat_pb2.CreateRequest()) == 3


async def test_admit_reserves_on_every_limit_of_key_and_org_and_settle_corrects() -> None:
    limiter, _, _ = await limiter_with()
    minute = minute_of(NOON)
    prompt = estimate_prompt_tokens(request(max_tokens=50))
    ticket = await limiter.admit(ACTOR, request(max_tokens=50))
    assert ticket is not None
    reserved_spend = spend_of(prompt, 50)
    for scope, subject in (("key", "k1"), ("org", "acme")):
        assert value(limiter, f"{scope}:{subject}:requests_per_minute:{minute}") == 1
        assert value(limiter, f"{scope}:{subject}:tokens_per_minute:{minute}") == prompt + 50
        assert value(limiter, f"{scope}:{subject}:spend_per_day:2026-03-14") == reserved_spend
        assert value(limiter, f"{scope}:{subject}:spend_per_month:2026-03") == reserved_spend
    ticket.settle(usage(30, "0.000123456789"))
    ticket.settle(usage(999, "9"))  # once only
    for scope, subject in (("key", "k1"), ("org", "acme")):
        assert value(limiter, f"{scope}:{subject}:requests_per_minute:{minute}") == 1
        assert value(limiter, f"{scope}:{subject}:tokens_per_minute:{minute}") == 30
        assert value(limiter, f"{scope}:{subject}:spend_per_day:2026-03-14") == 123457  # rounded up
        assert value(limiter, f"{scope}:{subject}:spend_per_month:2026-03") == 123457


async def test_guard_count_is_used_and_a_failed_call_used_nothing() -> None:
    limiter, _, _ = await limiter_with(org=None)
    minute = minute_of(NOON)
    ticket = await limiter.admit(ACTOR, request(), prompt_tokens=1000)
    assert ticket is not None
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 1000
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == spend_of(1000, 0)
    ticket.settle(None)
    assert value(limiter, f"key:k1:requests_per_minute:{minute}") == 1  # the request still counts
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 0
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == 0


async def test_settle_unfinished_keeps_the_prompt_and_counts_the_answer() -> None:
    limiter, _, _ = await limiter_with(org=None)
    minute = minute_of(NOON)
    ticket = await limiter.admit(ACTOR, request(max_tokens=200), prompt_tokens=100)
    assert ticket is not None
    ticket.settle_unfinished(40)
    ticket.settle(usage(5000, "1"))  # a no-op after settle_unfinished
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 140
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == spend_of(100, 40)
    other = await limiter.admit(ACTOR, request(max_tokens=200), prompt_tokens=100)
    assert other is not None
    other.settle_unfinished(None)  # nothing relayed: what it reserved
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 140 + 300


async def test_all_or_nothing_across_key_and_org_and_the_refusal_details() -> None:
    limiter, _, _ = await limiter_with(org=Limits(requests_per_minute=1))
    minute = minute_of(NOON)
    ticket = await limiter.admit(ACTOR, request(max_tokens=10))
    assert ticket is not None
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(max_tokens=10))
    # The org refused: nothing of the refused call is on the key's counters either.
    assert value(limiter, f"key:k1:requests_per_minute:{minute}") == 1
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == estimate_prompt_tokens(request()) + 10
    error = refused.value
    assert error.metadata == {
        "scope": "org",
        "subject": "acme",
        "limit": "requests_per_minute",
        "value": "1",
        "retry_after_s": "30",
    }
    assert error.retry_delay == pytest.approx(30.0)
    assert error.quota_violations == (
        (
            "org:acme:requests_per_minute",
            "the organization's limit requests_per_minute (1) is reached; it frees in 30 s",
        ),
    )


async def test_a_call_bigger_than_a_spend_limit_is_refused_with_its_own_message() -> None:
    limiter, _, _ = await limiter_with(key=Limits(spend_per_day=1000), org=None)  # a micro-dollar
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(), prompt_tokens=10**6)
    assert refused.value.metadata["limit"] == "spend_per_day"
    assert refused.value.metadata["value"] == "0.000001"
    needs = "this call alone needs more than the key's limit spend_per_day (0.000001 USD)"
    assert refused.value.message == needs
    assert refused.value.retry_delay == pytest.approx(MIDNIGHT - NOON)
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == 0


async def test_unpriced_model_under_a_spend_limit_is_refused() -> None:
    limiter, _, _ = await limiter_with(key=Limits(spend_per_month=10**9), org=None)
    with pytest.raises(FailedPrecondition):
        await limiter.admit(ACTOR, request(model="no-such-model"))
    limiter, _, _ = await limiter_with(key=Limits(requests_per_minute=5), org=None)
    assert await limiter.admit(ACTOR, request(model="no-such-model")) is not None  # no price needed


async def test_no_limits_admits_nothing_and_may_apply_knows_it() -> None:
    limiter, _, _ = await limiter_with(key=None, org=None)
    assert limiter.may_apply(ACTOR)  # nothing cached yet: it has to look
    assert await limiter.admit(ACTOR, request()) is None
    assert not limiter.may_apply(ACTOR)
    assert limiter.may_apply(Actor(organization_id="other"))


async def test_minute_rollover_uses_new_counters_and_settles_go_to_the_admission_window() -> None:
    start = datetime(2026, 3, 14, 12, 0, 59, tzinfo=UTC).timestamp()
    per_minute = Limits(requests_per_minute=1, tokens_per_minute=10**6)
    limiter, _, clock = await limiter_with(key=per_minute, org=None, now=start)
    first = await limiter.admit(ACTOR, request(), prompt_tokens=100)
    assert first is not None
    with pytest.raises(QuotaExceeded):
        await limiter.admit(ACTOR, request(), prompt_tokens=100)
    clock.now = start + 1  # the next minute: a fresh counter, the cached keys are not reused
    second = await limiter.admit(ACTOR, request(), prompt_tokens=100)
    assert second is not None
    first.settle(usage(7))
    second.settle(usage(9))
    old, new = minute_of(start), minute_of(start + 1)
    assert value(limiter, f"key:k1:tokens_per_minute:{old}") == 7
    assert value(limiter, f"key:k1:tokens_per_minute:{new}") == 9
    assert value(limiter, f"key:k1:requests_per_minute:{new}") == 1
    clock.now = start  # the clock went back: the old minute's counters again
    with pytest.raises(QuotaExceeded):
        await limiter.admit(ACTOR, request(), prompt_tokens=100)


async def test_spend_per_day_ends_at_midnight_utc_and_a_late_call_counts_in_its_day() -> None:
    limiter, _, clock = await limiter_with(key=Limits(spend_per_day=10**9), org=None, now=MIDNIGHT - 1)
    late = await limiter.admit(ACTOR, request(), prompt_tokens=10)
    assert late is not None
    clock.now = MIDNIGHT
    early = await limiter.admit(ACTOR, request(), prompt_tokens=10)
    assert early is not None
    late.settle(usage(10, "0.5"))
    early.settle(usage(10, "0.25"))
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == 500_000_000
    assert value(limiter, "key:k1:spend_per_day:2026-03-15") == 250_000_000


async def test_a_limits_change_applies_to_the_next_call() -> None:
    limiter, store, _ = await limiter_with(key=Limits(requests_per_minute=100), org=None)
    minute = minute_of(NOON)
    assert await limiter.admit(ACTOR, request()) is not None
    await limiter.book.set("key", "k1", Limits(requests_per_minute=1))  # set here: at once
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request())
    assert refused.value.metadata["value"] == "1"
    await limiter.book.set("key", "k1", Limits(tokens_per_minute=10**6))  # another metric
    ticket = await limiter.admit(ACTOR, request(), prompt_tokens=50)
    assert ticket is not None
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 50
    assert value(limiter, f"key:k1:requests_per_minute:{minute}") == 1  # no longer counted
    # Set elsewhere (another server, the CLI): applies once the book's cache entry expires.
    store.rows[("org", "acme")] = (None, 60, None, None)
    limiter.book._cache.clear()
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(), prompt_tokens=61)
    assert refused.value.metadata["scope"] == "org"
    await limiter.book.set("key", "k1", Limits())
    await limiter.book.set("org", "acme", Limits())
    assert await limiter.admit(ACTOR, request(), prompt_tokens=61) is None


async def test_many_subjects_share_the_limiter() -> None:
    limiter, _, _ = await limiter_with(key=None, org=None)
    minute = minute_of(NOON)
    for index in range(50):
        await limiter.book.set("key", f"k{index}", Limits(requests_per_minute=1))
    for index in range(50):
        actor = Actor(organization_id="acme", key_id=f"k{index}")
        assert await limiter.admit(actor, request()) is not None
        with pytest.raises(QuotaExceeded):
            await limiter.admit(actor, request())
    assert all(value(limiter, f"key:k{index}:requests_per_minute:{minute}") == 1 for index in range(50))


async def test_shared_counters_get_every_check_in_key_then_org_order() -> None:
    counters = RecordingCounters()
    limiter, _, _ = await limiter_with(counters=counters)
    ticket = await limiter.admit(ACTOR, request(max_tokens=20), prompt_tokens=100)
    assert ticket is not None
    minute = minute_of(NOON)
    minute_end, day_end = (minute + 1) * 60.0, MIDNIGHT
    month_end = datetime(2026, 4, 1, tzinfo=UTC).timestamp()
    spend = spend_of(100, 20)
    expected: list[Check] = []
    for scope, subject in (("key", "k1"), ("org", "acme")):
        expected += [
            (f"{scope}:{subject}:requests_per_minute:{minute}", 100, 1, 120, minute_end),
            (f"{scope}:{subject}:tokens_per_minute:{minute}", 10**6, 120, 120, minute_end),
            (f"{scope}:{subject}:spend_per_day:2026-03-14", 10**12, spend, 2 * 86400, day_end),
            (f"{scope}:{subject}:spend_per_month:2026-03", 10**12, spend, 32 * 86400, month_end),
        ]
    assert counters.admits == [(expected, NOON)]
    ticket.settle(usage(100, "0.000002"))
    settled = {key: (delta, ttl) for key, delta, ttl in counters.settles}
    for scope, subject in (("key", "k1"), ("org", "acme")):
        assert settled[f"{scope}:{subject}:tokens_per_minute:{minute}"] == (100 - 120, 120)
        assert settled[f"{scope}:{subject}:spend_per_day:2026-03-14"] == (2000 - spend, 2 * 86400)
        assert settled[f"{scope}:{subject}:spend_per_month:2026-03"] == (2000 - spend, 32 * 86400)
    assert not any(":requests_per_minute:" in key for key in settled)  # a request stays counted


async def test_shared_counters_refusal_names_the_refused_check() -> None:
    counters = RecordingCounters(outcome=5)  # the org's tokens_per_minute
    limiter, _, _ = await limiter_with(counters=counters)
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(), prompt_tokens=10)
    assert refused.value.metadata["scope"] == "org"
    assert refused.value.metadata["limit"] == "tokens_per_minute"


async def test_admitted_unchecked_settles_the_whole_usage() -> None:
    counters = RecordingCounters(outcome=UNCHECKED)
    limiter, _, _ = await limiter_with(key=Limits(tokens_per_minute=10**6, spend_per_day=10**12), org=None)
    limiter.counters = counters
    ticket = await limiter.admit(ACTOR, request(), prompt_tokens=100)
    assert ticket is not None
    ticket.settle(usage(80, "0.001"))
    minute = minute_of(NOON)
    assert sorted(counters.settles) == [
        ("key:k1:spend_per_day:2026-03-14", 1_000_000, 2 * 86400),
        (f"key:k1:tokens_per_minute:{minute}", 80, 120),
    ]


def test_meter_prices_the_usage_exactly() -> None:
    meter = Meter(PriceTable.load())
    used = chat_pb2.Usage(prompt_tokens=320, completion_tokens=40, total_tokens=360, cached_tokens=256)
    price = PriceTable.load().find("openai", "gpt-4o-mini")
    assert price is not None
    rates = price.rates
    expected = 64 * rates.input + 256 * rates.cached_input + 40 * rates.output
    assert meter.price("openai", "gpt-4o-mini", used) == expected
    assert used.cost_usd == f"{expected / 10**12:.12f}".rstrip("0")
    assert meter.totals[("openai", "gpt-4o-mini")].cost_pico == expected
    assert meter.price("openai", "no-such-model", used) is None
    assert used.cost_usd == ""


def test_memory_counters_prune_only_ended_windows() -> None:
    counters = MemoryCounters(prune_every=2)
    assert counters.admit_now([("a", 10, 1, 120, 100.0)], 50.0) == ADMITTED
    assert counters.admit_now([("b", 10, 1, 120, 200.0)], 150.0) == ADMITTED  # sweeps "a"
    assert counters.value("a") == 0 and counters.value("b") == 1
    counters.settle("a", 5, 120)  # a swept window: nothing to correct
    assert counters.value("a") == 0
    assert asyncio.run(counters.admit([("b", 1, 1, 120, 200.0)], 150.0)) == 0  # at its limit


def test_admit_rows_is_admit_now_of_the_same_checks() -> None:
    """The one-pass in-process admission (bump, take back on a refusal) against the two-pass one."""
    rng = random.Random(17)
    keys = [f"c{index}" for index in range(6)]
    for _ in range(2000):
        one, two = MemoryCounters(prune_every=10**9), MemoryCounters(prune_every=10**9)
        for key in rng.sample(keys, rng.randint(0, 6)):  # some counters already hold something
            start = rng.randint(0, 12)
            assert one.admit_now([(key, 100, start, 120, 1e12)], 0.0) == ADMITTED
            assert two.admit_now([(key, 100, start, 120, 1e12)], 0.0) == ADMITTED
        rows = [
            (key, rng.randint(0, 15), rng.randint(0, 3), 120, 1e12)
            for key in rng.sample(keys, rng.randint(1, 6))
        ]
        amounts = (1, rng.randint(0, 8), rng.randint(0, 8), rng.randint(0, 8))
        checks = [(key, limit, amounts[which], ttl, ends) for key, limit, which, ttl, ends in rows]
        assert one.admit_rows(rows, amounts, 0.0) == two.admit_now(checks, 0.0)
        assert [one.value(key) for key in keys] == [two.value(key) for key in keys]


async def test_a_first_call_refused_by_its_org_leaves_the_key_counters_at_zero() -> None:
    limiter, _, _ = await limiter_with(org=Limits(tokens_per_minute=50))
    minute = minute_of(NOON)
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(), prompt_tokens=100)
    assert refused.value.metadata["scope"] == "org"
    assert value(limiter, f"key:k1:requests_per_minute:{minute}") == 0
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 0
    assert value(limiter, "key:k1:spend_per_day:2026-03-14") == 0
    assert await limiter.admit(ACTOR, request(), prompt_tokens=50) is not None
    assert value(limiter, f"key:k1:requests_per_minute:{minute}") == 1


class SlowStore(FakeStore):
    """A store whose lookups wait for `release` (a lookup under way while others arrive)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def _fetch_limits(self, *, scope: str, subject: str) -> tuple[int | None, ...] | None:
        self.fetches += 1
        row = self.rows.get((scope, subject))  # read now, answered later
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return row


async def lookups(store: FakeStore, count: int) -> None:
    """Until `count` lookups have begun."""
    for _ in range(100):
        if store.fetches >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{store.fetches} lookups, not {count}")


async def test_calls_that_miss_the_book_together_share_one_lookup() -> None:
    store = SlowStore()
    store.rows[("key", "k1")] = (5, None, None, None)
    book = LimitsBook(store, cache_ttl=60.0)  # type: ignore[arg-type]
    waiters = [asyncio.create_task(book.get("key", "k1")) for _ in range(50)]
    await lookups(store, 1)
    waiters[0].cancel()  # one caller gone: the others still get their answer
    store.release.set()
    results = await asyncio.gather(*waiters[1:])
    assert store.fetches == 1
    assert all(limits == Limits(requests_per_minute=5) for limits in results)
    assert waiters[0].cancelled()
    assert book.cached("key", "k1") == Limits(requests_per_minute=5)
    assert await book.get("key", "k1") == Limits(requests_per_minute=5) and store.fetches == 1


async def test_a_failed_lookup_fails_its_callers_and_is_not_cached() -> None:
    store = SlowStore()
    store.fail = OSError("database is locked")
    book = LimitsBook(store, cache_ttl=60.0)  # type: ignore[arg-type]
    waiters = [asyncio.create_task(book.get("org", "acme")) for _ in range(3)]
    await lookups(store, 1)
    store.release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert store.fetches == 1 and all(isinstance(outcome, OSError) for outcome in outcomes)
    store.fail = None
    assert await book.get("org", "acme") == Limits() and store.fetches == 2


async def test_a_set_during_a_lookup_is_what_the_next_lookup_reads() -> None:
    store = SlowStore()
    store.rows[("key", "k1")] = (5, None, None, None)
    book = LimitsBook(store, cache_ttl=60.0)  # type: ignore[arg-type]
    early = asyncio.create_task(book.get("key", "k1"))
    await lookups(store, 1)  # it has read the old row
    await book.set("key", "k1", Limits(requests_per_minute=7))
    late = asyncio.create_task(book.get("key", "k1"))  # does not join the lookup begun before
    await lookups(store, 2)
    store.release.set()
    assert await early == Limits(requests_per_minute=5)  # what it read when it began
    assert await late == Limits(requests_per_minute=7)
    assert book.cached("key", "k1") == Limits(requests_per_minute=7)
    assert store.fetches == 2


async def test_a_lookup_begun_before_a_set_is_not_cached() -> None:
    store = SlowStore()
    store.rows[("org", "acme")] = (5, None, None, None)
    book = LimitsBook(store, cache_ttl=60.0)  # type: ignore[arg-type]
    early = asyncio.create_task(book.get("org", "acme"))
    await lookups(store, 1)
    await book.set("org", "acme", Limits(requests_per_minute=7))
    store.release.set()
    assert await early == Limits(requests_per_minute=5)
    assert book.cached("org", "acme") is None  # the stale answer was not kept
    assert await book.get("org", "acme") == Limits(requests_per_minute=7)


async def test_may_apply_until_the_book_knows_both_are_unlimited() -> None:
    store = FakeStore()
    now = [100.0]
    book = LimitsBook(store, cache_ttl=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    limiter = Limiter(book, MemoryCounters(), PriceTable.load())
    anonymous = Actor(organization_id="acme")
    assert limiter.may_apply(ACTOR) and limiter.may_apply(anonymous)  # nothing known
    await book.get("org", "acme")
    assert not limiter.may_apply(anonymous)  # no key: the organization's limits decide
    assert limiter.may_apply(ACTOR)  # the key's are not known yet
    await book.get("key", "k1")
    assert not limiter.may_apply(ACTOR)
    now[0] += 5.0  # expired: look again
    assert limiter.may_apply(ACTOR) and limiter.may_apply(anonymous)
    store.rows[("key", "k1")] = (None, None, 10, None)
    await book.get("org", "acme")
    await book.get("key", "k1")
    assert limiter.may_apply(ACTOR) and not limiter.may_apply(anonymous)
    store.rows[("org", "acme")] = (1, None, None, None)
    now[0] += 5.0
    await book.get("org", "acme")
    assert limiter.may_apply(anonymous)


def test_admit_rows_refused_leaves_the_counters_exactly_as_admit_now() -> None:
    """A refusal part-way takes back the bumps and the counters it created: the table is the
    one `admit_now` leaves (which creates nothing on a refusal), not one with 0 entries."""
    rng = random.Random(29)
    keys = [f"c{index}" for index in range(6)]
    for _ in range(2000):
        one, two = MemoryCounters(prune_every=10**9), MemoryCounters(prune_every=10**9)
        for key in rng.sample(keys, rng.randint(0, 6)):
            start = rng.randint(0, 12)
            assert one.admit_now([(key, 100, start, 120, 1e12)], 0.0) == ADMITTED
            assert two.admit_now([(key, 100, start, 120, 1e12)], 0.0) == ADMITTED
        rows = [
            (key, rng.randint(0, 15), rng.randint(0, 3), 120, 1e12)
            for key in rng.sample(keys, rng.randint(1, 6))
        ]
        amounts = (1, rng.randint(0, 8), rng.randint(0, 8), rng.randint(0, 8))
        checks = [(key, limit, amounts[which], ttl, ends) for key, limit, which, ttl, ends in rows]
        assert one.admit_rows(rows, amounts, 0.0) == two.admit_now(checks, 0.0)
        assert one._values == two._values


async def test_refused_calls_do_not_grow_the_in_process_counters() -> None:
    """An organization out of budget (every call refused by its spend counter, after its keys'
    counters): the keys' counters of each new minute must not pile up in the table, which only
    an admitted call would sweep."""
    counters = MemoryCounters(prune_every=50)
    limiter, _, clock = await limiter_with(
        key=None, org=Limits(spend_per_day=0), counters=counters, now=MIDNIGHT + 30
    )
    for index in range(20):
        await limiter.book.set("key", f"k{index}", Limits(requests_per_minute=100, tokens_per_minute=10**6))
    for minute in range(60):
        clock.now = MIDNIGHT + 30 + 60 * minute
        for index in range(20):
            actor = Actor(organization_id="acme", key_id=f"k{index}")
            with pytest.raises(QuotaExceeded) as refused:
                await limiter.admit(actor, request(), prompt_tokens=10)
            assert refused.value.metadata["scope"] == "org"
    assert len(counters._values) == 0  # admit_now: a refused call creates no counter


async def test_a_settle_for_a_swept_window_is_dropped_even_after_a_refusal_there() -> None:
    """The clock goes back into a minute whose counters were swept: a call refused there must
    not leave a counter behind for an older call's correction to land on (the correction of a
    swept window is dropped; landing, it would put the counter below what was admitted)."""
    counters = MemoryCounters(prune_every=1)
    limiter, _, clock = await limiter_with(
        key=Limits(tokens_per_minute=100), org=Limits(spend_per_day=spend_of(10, 0)), counters=counters
    )
    minute = minute_of(NOON)
    first = await limiter.admit(ACTOR, request(), prompt_tokens=10)  # the org's day is now full
    assert first is not None
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 10
    clock.now = NOON + 60  # the next minute: another caller's admission sweeps the minute before
    await limiter.book.set("key", "k9", Limits(requests_per_minute=5))
    assert await limiter.admit(Actor(organization_id="other", key_id="k9"), request()) is not None
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 0  # swept
    clock.now = NOON  # the clock went back
    with pytest.raises(QuotaExceeded) as refused:
        await limiter.admit(ACTOR, request(), prompt_tokens=10)
    assert refused.value.metadata["limit"] == "spend_per_day"
    first.settle(None)  # failed: its 10 tokens come back, to a window already swept
    assert value(limiter, f"key:k1:tokens_per_minute:{minute}") == 0
