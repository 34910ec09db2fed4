"""Routing cooldowns shared by every replica through Redis (`LLMGW_REDIS_URL`).

A deployment (or key) cooled down on one replica is skipped by the others: the replica that
cools a unit writes `llmgw:cooldown:<unit>` with a PX expiry of the cooldown, through a Lua
script that only ever lengthens it (a Retry-After extension is never shortened by a shorter
cooldown from another replica), and publishes the new length on `llmgw:cooldowns` in the same
script. Every replica subscribes and applies what it hears to its own `Health` (again never
shortening), so the request path reads nothing from Redis: it keeps reading the local map.
A replica that (re)connects also reads the cooldowns already in Redis (SCAN, bounded), so one
started, or cut off, while a deployment was cooling catches up.

Lengths travel as milliseconds left, not as clock times: replicas' clocks need not agree.

Bounded: writes wait in a map of at most `MAX_PENDING` units (one pipeline sends them, the
way limit settles are sent), a message or key with a unit longer than `MAX_UNIT_BYTES` or a
length over `MAX_SECONDS` is clamped or ignored, and `Health` holds at most its `MAX_UNITS`.

Redis down: cooldowns stay local to each replica (the behaviour without Redis), with a warning
logged at most every 10 s; the subscriber reconnects with a backoff of up to 10 s and logs when
cooldowns are shared again. Nothing on the request path waits for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.routing.health import Health

log = logging.getLogger("llmgateway.routing")

PREFIX = "llmgw:cooldown:"
CHANNEL = "llmgw:cooldowns"
MAX_PENDING = 1_000
MAX_UNIT_BYTES = 512
MAX_SECONDS = 3_600.0  # no shared cooldown outlives an hour, whatever a Retry-After said
MAX_LOADED = 10_000  # cooldowns read from Redis on (re)connect
_WARN_EVERY = 10.0
# KEYS[1] the unit's key; ARGV: milliseconds, channel, message. Lengthens only; publishes a change.
_COOL = """
local want = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left >= want then
  return left
end
redis.call('SET', KEYS[1], '1', 'PX', want)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return want
"""


class SharedCooldowns:
    """Writes this replica's cooldowns to Redis and applies the other replicas' ones to `health`."""

    def __init__(
        self, url: str, health: Health, *, timeout: float = 0.5, flush_interval: float = 0.01
    ) -> None:
        self.health = health
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        # The subscription waits for messages indefinitely: no read timeout on its connection.
        self._listener: Any = aioredis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_keepalive=True, health_check_interval=30
        )
        self._flush_interval = flush_interval
        self._pending: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # subscribed and caught up (tests wait for it)
        self.failures = 0
        self.dropped = 0
        self.applied = 0
        self._warned_at = 0.0
        self._down = False

    def start(self) -> None:
        self.health.on_cool = self.share
        self._subscriber = asyncio.get_running_loop().create_task(self._subscribe())

    # -- this replica's cooldowns -------------------------------------------------------------

    def share(self, unit: str, seconds: float) -> None:
        """Called by `Health.cool` when it lengthened a cooldown here; never blocks."""
        if len(unit.encode()) > MAX_UNIT_BYTES:
            return
        seconds = min(seconds, MAX_SECONDS)
        pending = self._pending.get(unit)
        if pending is not None:
            self._pending[unit] = max(pending, seconds)
        elif len(self._pending) < MAX_PENDING:
            self._pending[unit] = seconds
        else:
            self.dropped += 1
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_interval)
        await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for unit, seconds in pending.items():
            ms = max(1, math.ceil(seconds * 1000))
            pipe.eval(_COOL, 1, PREFIX + unit, ms, CHANNEL, f"{ms} {unit}")
        try:
            await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self.failures += 1
            self._warn(exc)

    # -- the other replicas' cooldowns --------------------------------------------------------

    def apply(self, message: bytes | str) -> None:
        """One published cooldown ("<milliseconds> <unit>"): never shortens one running here."""
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        ms_text, _, unit = text.partition(" ")
        if not unit or len(unit.encode()) > MAX_UNIT_BYTES or not ms_text.isdigit():
            return
        self.health.cool(unit, min(int(ms_text) / 1000, MAX_SECONDS), share=False)
        self.applied += 1

    async def _catch_up(self) -> None:
        """The cooldowns already in Redis (set before this replica subscribed)."""
        keys: list[bytes] = []
        async for key in self._redis.scan_iter(match=PREFIX + "*", count=500):
            keys.append(key)
            if len(keys) >= MAX_LOADED:
                break
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            pipe = self._redis.pipeline(transaction=False)
            for key in chunk:
                pipe.pttl(key)
            for key, left in zip(chunk, await pipe.execute(), strict=True):
                if isinstance(left, int) and left > 0:
                    self.apply(f"{left} {key.decode(errors='replace')[len(PREFIX) :]}")

    async def _subscribe(self) -> None:
        backoff = 0.5
        while True:
            pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self._catch_up()  # after subscribing: nothing published in between is missed
                if self._down:
                    log.info("routing cooldowns: Redis is back, cooldowns are shared again")
                    self._down = False
                self.connected.set()
                backoff = 0.5
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.apply(message["data"])
                raise ConnectionError("subscription ended")
            except (TimeoutError, RedisError, OSError) as exc:
                self.connected.clear()
                self.failures += 1
                self._warn(exc)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _warn(self, exc: BaseException) -> None:
        self._down = True
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "routing cooldowns: Redis unavailable (%s): cooldowns are local to this replica "
                "until it is back",
                type(exc).__name__,
            )

    async def close(self) -> None:
        self.health.on_cool = None
        for task in (self._subscriber, self._flusher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.flush()
        await self._redis.aclose()
        await self._listener.aclose()
