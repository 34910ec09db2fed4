"""ConfigCache under the offload pool: `put` runs in several threads at once (validation and
the body are built off the loop for big requests), and the key bytes it counts must stay the
bytes it holds, or the 1 MiB bound drifts away (down: up to 1,024 entries of 64 KiB each kept;
up: every put evicts everything)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from server.core.config_cache import ConfigCache


@pytest.fixture
def switch_often() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a thread switch at almost every call: races show
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_the_bytes_counted_are_the_bytes_held_after_racing_puts(switch_often: None) -> None:
    cache: ConfigCache[bytes, int] = ConfigCache(max_entries=8, max_bytes=10_000)
    # 12 keys of 1,000-3,000 bytes over 8 entries / 10,000 bytes: puts of the same key and
    # evictions of it race.
    keys = [bytes([i]) * (1_000 + 200 * i) for i in range(12)]
    start = threading.Barrier(4)

    def hammer(offset: int) -> None:
        start.wait()
        for n in range(20_000):
            key = keys[(n * 7 + offset) % len(keys)]
            cache.put(key, n, len(key))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = sum(len(key) for key in cache.keys())
    assert cache.held_bytes == held, (cache.held_bytes, held, len(cache))
    assert held <= 10_000 and len(cache) <= 8
