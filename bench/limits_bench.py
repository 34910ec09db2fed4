"""What limits and cost add to a request: `python -m bench.limits_bench [--iterations N]`.

Runs the request path's own code, in this process, with no server around it:
  * cost: `Meter.price` on the answer's Usage (every request, limits or not);
  * in-process limits: `Limiter.admit` + `Ticket.settle` for a key and its organization, each
    with all four limits (8 counters: the worst case), with the guard's prompt count (a request
    with a context window, as the bench workload), and again without one (admission estimates
    the message texts, `limiter.estimate_prompt_tokens`);
  * no limits: the `may_apply` check alone (what a caller without limits pays);
  * Redis: the same admissions against a real redis-server (started here in a temp dir, when
    installed), counting the round trips per request (EVALSHA and settle pipelines).
CPU is process CPU time (`time.process_time`) over all iterations, divided by their number.
The budget (issue 17): check + settle + cost with in-process counters at most 15 us per request.
Prints one table row per measurement, with a verdict column.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.auth.store_sqlite import SqliteAuthStore
from server.billing.meter import Meter
from server.billing.prices import PriceTable
from server.core import tokens
from server.limits.book import LimitsBook
from server.limits.counters import Counters, MemoryCounters
from server.limits.limiter import Limiter
from server.limits.model import Limits

BUDGET_US = 15.0
ALL_LIMITS = Limits(
    requests_per_minute=10**12, tokens_per_minute=10**15, spend_per_day=10**17, spend_per_month=10**17
)


def request() -> chat_pb2.CreateRequest:
    config = chat_pb2.LLMConfig(model="gpt-4o-mini", model_endpoint_type="openai", context_window=128000)
    text = "What is the weather in Paris today, and should I bring an umbrella to the office?"
    return chat_pb2.CreateRequest(
        llm_config=config,
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are a helpful assistant. " * 40),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=text),
        ],
    )


def usage() -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=320, completion_tokens=40, total_tokens=360, cached_tokens=256)


async def setup(
    directory: Path, counters: Counters, key_limits: Limits = ALL_LIMITS, org_limits: Limits = ALL_LIMITS
) -> tuple[Limiter, SqliteAuthStore, Actor]:
    store = SqliteAuthStore(path=str(directory / f"keys-{id(counters)}.db"))
    await store.start()
    key_id, _ = await store.create_key(organization_id="acme")
    book = LimitsBook(store, cache_ttl=3600.0)
    await book.set("key", key_id, key_limits)
    await book.set("org", "acme", org_limits)
    limiter = Limiter(book, counters, PriceTable.load())
    return limiter, store, Actor(organization_id="acme", key_id=key_id)


async def measure_limits(
    limiter: Limiter, actor: Actor, meter: Meter, n: int, *, guard_count: int | None = 330
) -> float:
    """`guard_count`: the prompt's tokens as the guard counted them (a request with a context
    window, as the bench workload); None: no guard count, admission estimates the texts."""
    req, used = request(), usage()
    for _ in range(200):  # warm: caches, memo, first-window entries
        ticket = await limiter.admit(actor, req, prompt_tokens=guard_count)
        meter.price("openai", "gpt-4o-mini", used)
        assert ticket is not None
        ticket.settle(used)
    started = time.process_time()
    for _ in range(n):
        ticket = await limiter.admit(actor, req, prompt_tokens=guard_count)
        meter.price("openai", "gpt-4o-mini", used)
        assert ticket is not None
        ticket.settle(used)
    return (time.process_time() - started) / n * 1e6


def measure_cost(meter: Meter, n: int) -> float:
    used = usage()
    started = time.process_time()
    for _ in range(n):
        meter.price("openai", "gpt-4o-mini", used)
    return (time.process_time() - started) / n * 1e6


def measure_no_limits(limiter: Limiter, n: int) -> float:
    free = Actor(organization_id="free-org", key_id="0123456789abcdef")
    limiter.book._cache[("org", "free-org")] = (time.monotonic() + 3600, Limits())
    limiter.book._cache[("key", free.key_id)] = (time.monotonic() + 3600, Limits())
    started = time.process_time()
    for _ in range(n):
        limiter.may_apply(free)
    return (time.process_time() - started) / n * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure_redis(directory: Path, n: int) -> tuple[float, float, float] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    from server.limits.redis_counters import RedisCounters

    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        counters = RedisCounters(f"redis://127.0.0.1:{port}/0")
        for _ in range(100):
            try:
                await counters._redis.ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.05)
        limiter, store, actor = await setup(directory, counters)
        meter = Meter(PriceTable.load())
        req, used = request(), usage()
        for _ in range(50):
            ticket = await limiter.admit(actor, req)
            assert ticket is not None
            ticket.settle(used)
        await counters.flush()
        trips_before = counters.round_trips
        started_cpu, started_wall = time.process_time(), time.perf_counter()

        # 32 concurrent callers, as a loaded server has: settles batch across them.
        async def caller(count: int) -> None:
            for _ in range(count):
                ticket = await limiter.admit(actor, req)
                meter.price("openai", "gpt-4o-mini", used)
                assert ticket is not None
                ticket.settle(used)

        await asyncio.gather(*(caller(n // 32) for _ in range(32)))
        await counters.flush()
        done = (n // 32) * 32
        cpu = (time.process_time() - started_cpu) / done * 1e6
        wall = (time.perf_counter() - started_wall) / done * 1e6
        trips = (counters.round_trips - trips_before) / done
        await counters.close()
        await store.close()
        return cpu, wall, trips
    finally:
        process.kill()
        process.wait(timeout=10)


def row(name: str, value: str, verdict: str) -> None:
    print(f"| {name:<58} | {value:>16} | {verdict:<28} |")


async def main(iterations: int) -> None:
    tokens.preload()
    with tempfile.TemporaryDirectory(prefix="llmgw-limits-bench-") as tmp:
        directory = Path(tmp)
        limiter, store, actor = await setup(directory, MemoryCounters())
        meter = Meter(PriceTable.load())
        cost = measure_cost(meter, iterations)
        limited = await measure_limits(limiter, actor, meter, iterations)
        counting = await measure_limits(limiter, actor, meter, iterations, guard_count=None)
        free = measure_no_limits(limiter, iterations)
        await store.close()
        # Typical: a key's requests per minute and its organization's daily budget (2 counters).
        typical_limiter, store, actor = await setup(
            directory, MemoryCounters(), Limits(requests_per_minute=10**12), Limits(spend_per_day=10**17)
        )
        typical = await measure_limits(typical_limiter, actor, meter, iterations)
        await store.close()
        # Requests per minute only: no prompt count, no price (1 counter).
        rpm_limiter, store, actor = await setup(
            directory, MemoryCounters(), Limits(requests_per_minute=10**12), Limits()
        )
        rpm_only = await measure_limits(rpm_limiter, actor, meter, iterations)
        await store.close()
        redis_dir = directory / "redis"
        redis_dir.mkdir()
        redis = await measure_redis(redis_dir, min(iterations, 20000))
    print("| measurement | per request | verdict |")
    print("| --- | --- | --- |")
    row("cost only (Meter.price)", f"{cost:.2f} us CPU", "-")
    verdict = "PASS" if limited <= BUDGET_US else "FAIL"
    row(
        "in-process: admit + settle + cost, key+org, 8 counters",
        f"{limited:.2f} us CPU",
        f"{verdict} (budget {BUDGET_US:g} us)",
    )
    verdict = "PASS" if counting <= BUDGET_US else "FAIL"
    row("  same, no context window (admission estimates the prompt)", f"{counting:.2f} us CPU", verdict)
    verdict = "PASS" if typical <= BUDGET_US else "FAIL"
    row("in-process: key rpm + org spend/day (2 counters), + cost", f"{typical:.2f} us CPU", verdict)
    verdict = "PASS" if rpm_only <= BUDGET_US else "FAIL"
    row("in-process: key rpm only (1 counter), + cost", f"{rpm_only:.2f} us CPU", verdict)
    row("no limits for the caller (may_apply)", f"{free:.2f} us CPU", "-")
    if redis is None:
        row("Redis", "redis-server not installed", "SKIPPED")
    else:
        cpu, wall, trips = redis
        verdict = "PASS" if trips <= 1.05 else "FAIL"
        row("Redis: admit + settle + cost, 32 concurrent, 8 counters", f"{cpu:.1f} us CPU", "-")
        row(
            "Redis: round trips per request (EVALSHA + batched settles)",
            f"{trips:.3f}",
            f"{verdict} (1 per request)",
        )
        row("Redis: wall time per request (32 concurrent)", f"{wall:.1f} us", "-")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().iterations))
