"""ConfigCache: bounded in entries and in key bytes; a key over the cacheable size is never kept."""

from __future__ import annotations

from server.core.config_cache import MAX_CACHED_CONFIG_BYTES, ConfigCache


def test_oldest_entries_go_first_past_the_entry_bound() -> None:
    cache: ConfigCache[bytes, int] = ConfigCache(max_entries=3, max_bytes=1 << 20)
    for i in range(5):
        cache.put(b"k%d" % i, i, 2)
    assert cache.keys() == [b"k2", b"k3", b"k4"]
    assert cache.get(b"k0") is None and cache.get(b"k4") == 4
    assert cache.held_bytes == 6


def test_the_key_bytes_held_stay_within_their_bound() -> None:
    cache: ConfigCache[bytes, str] = ConfigCache(max_entries=1024, max_bytes=100_000)
    for i in range(10):
        cache.put(bytes([i]) * 30_000, "v", 30_000)
        assert cache.held_bytes <= 100_000
    assert len(cache) == 3  # 3 x 30,000 fit in 100,000; a 4th would not
    assert cache.get(bytes([9]) * 30_000) == "v"


def test_a_key_over_the_cacheable_size_is_never_kept() -> None:
    cache: ConfigCache[bytes, str] = ConfigCache()
    big = b"x" * (MAX_CACHED_CONFIG_BYTES + 1)
    assert cache.put(big, "answer", len(big)) == "answer"
    assert len(cache) == 0 and cache.held_bytes == 0
    exact = b"x" * MAX_CACHED_CONFIG_BYTES
    cache.put(exact, "kept", len(exact))
    assert cache.get(exact) == "kept"


def test_putting_a_key_again_counts_its_bytes_once() -> None:
    cache: ConfigCache[bytes, int] = ConfigCache(max_entries=10, max_bytes=1000)
    for value in range(5):
        cache.put(b"same", value, 400)
    assert (len(cache), cache.held_bytes, cache.get(b"same")) == (1, 400, 4)
    cache.clear()
    assert (len(cache), cache.held_bytes) == (0, 0)
