"""Limit counters in Redis (`LLMGW_REDIS_URL`), shared by every replica.

Admission is one round trip: a Lua script (EVALSHA) reads every counter of the call, refuses if
any is at its limit or would pass it, and otherwise INCRBYs them all and sets each key's expiry
(the window's length and a margin, set once: EXPIRE NX), atomically: concurrent calls on any
number of replicas never admit more than a limit allows. Counter keys hold their window
(`llmgw:limit:key:<id>:requests_per_minute:<minute>`), so a new window starts at 0 with no reset.

Settling is batched: each call's correction (used minus reserved) is added to a pending delta
per counter, and one pipeline (INCRBY and EXPIRE per counter, no transaction) sends them every
`flush_interval` seconds, so settling adds no round trip of its own under load. A replica's
own pending deltas are not seen by the others for up to that interval.

Redis down (refused, reset, timed out): the policy `LLMGW_LIMITS_REDIS_FAILURE` decides:
`open` (the default) admits the call unchecked, with a warning (logged at most every 10 s) and
the `failures` counter; `closed` refuses it with UNAVAILABLE LIMITS_UNAVAILABLE. A call
admitted unchecked settles its whole usage, not a correction, so it is counted once Redis is
back. Deltas that cannot be sent are dropped and counted (`dropped_settles`): holding them
unbounded while Redis is away would be worse than a window (a month at most) under-counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server import metrics
from server.errors import LimitsUnavailable
from server.limits.counters import UNCHECKED, Check

log = logging.getLogger("llmgateway.limits")

PREFIX = "llmgw:limit:"
_ADMIT = """
local n = #KEYS
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[3 * i - 2])
  if current >= limit or current + tonumber(ARGV[3 * i - 1]) > limit then
    return i
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[3 * i], 'NX')
end
return 0
"""
_MAX_PENDING = 100_000  # distinct counters with a pending delta (a bound, not an expectation)


class RedisCounters:
    """`Counters` over one Redis (redis.asyncio, its own connection pool)."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = True,
        timeout: float = 0.5,
        flush_interval: float = 0.05,
        client: Any = None,
    ) -> None:
        self._redis: Any = client or aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._script = self._redis.register_script(_ADMIT)
        self.fail_open = fail_open
        self._flush_interval = flush_interval
        self._pending: dict[str, list[int]] = {}  # key -> [delta, ttl]
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0
        self.failures = 0  # admissions Redis could not answer
        self.dropped_settles = 0
        self._warned_at = 0.0

    async def admit(self, checks: Sequence[Check], now: float) -> int:
        keys = [PREFIX + c[0] for c in checks]
        args: list[int] = []
        for _, limit, amount, ttl, _ in checks:
            args += (limit, amount, ttl)
        self.round_trips += 1
        try:
            refused = int(await self._script(keys=keys, args=args))
        except (TimeoutError, RedisError, OSError) as exc:
            return self._failed(exc)
        return refused - 1

    def _failed(self, exc: BaseException) -> int:
        self.failures += 1
        metrics.record_limits_redis_failure(admitted=self.fail_open)
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            policy = "admitting calls unchecked (fail open)"
            if not self.fail_open:
                policy = "refusing calls (fail closed)"
            log.warning("limits: Redis unavailable (%s): %s", type(exc).__name__, policy)
        if self.fail_open:
            return UNCHECKED
        raise LimitsUnavailable(
            "the gateway's limit counters are unavailable", metadata={"store": "redis"}, retry_delay=1.0
        ) from exc

    def settle(self, key: str, delta: int, ttl: int) -> None:
        if delta == 0:
            return
        pending = self._pending.get(key)
        if pending is not None:
            pending[0] += delta
        elif len(self._pending) < _MAX_PENDING:
            self._pending[key] = [delta, ttl]
        else:
            self.dropped_settles += 1
            metrics.record_limits_settles_dropped(1)
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    def settle_all(self, counters: Sequence[tuple[str, int]], delta: int) -> None:
        for key, ttl in counters:
            self.settle(key, delta, ttl)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_interval)
        await self.flush()

    async def flush(self) -> None:
        """Send every pending delta now, in one pipeline."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, (delta, ttl) in pending.items():
            pipe.incrby(PREFIX + key, delta)
            pipe.expire(PREFIX + key, ttl, nx=True)
        self.round_trips += 1
        try:
            await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self.dropped_settles += len(pending)
            metrics.record_limits_settles_dropped(len(pending))
            self._failed_settle(exc)

    def _failed_settle(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning("limits: Redis unavailable (%s): usage corrections dropped", type(exc).__name__)

    async def close(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await self.flush()
        await self._redis.aclose()
