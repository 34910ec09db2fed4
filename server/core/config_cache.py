"""What the request path works out from an LLMConfig, cached by the config's serialized bytes.

An agent resends the same config every step. Most are ~100-300 bytes; one that carries a
structured-output schema (`response_format.json_schema`) is commonly 5-50 KB, and working it out
again on every call cost more than the rest of the call (a 10 KB config: ~0.9 ms of checks,
body and trace copy, against ~0.6 ms for a whole plain call). So keys up to
`MAX_CACHED_CONFIG_BYTES` are kept, bounded in entries and in the key bytes held in all; a
bigger config (up to the 1 MiB a request may carry) is worked out anew every time, never kept.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_CACHED_CONFIG_BYTES = 64 * 1024
MAX_ENTRIES = 1024
MAX_HELD_BYTES = 1024 * 1024  # key bytes in one cache: 1,024 usual configs, or 16 of 64 KiB


class ConfigCache(Generic[K, V]):
    """A dict that forgets its oldest entries past `max_entries` entries or `max_bytes` of keys
    (FIFO: hits are the norm). `put` is told each key's size; over `max_entry_bytes`
    (`MAX_CACHED_CONFIG_BYTES` unless told) it keeps nothing. `get` takes no lock (one dict
    lookup); `put` and `clear` take one: they run in the offload pool's threads at once, and
    unlocked, two puts of one key (or a put and the eviction of its key) counted its bytes twice
    or not at all, a drift that only grew: held_bytes past the bound with one entry left (every
    put then evicts everything), or below the truth (the byte bound gone, 1,024 entries of 64 KiB
    kept)."""

    __slots__ = ("_data", "_max", "_max_bytes", "_max_entry_bytes", "_bytes", "_lock")

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_HELD_BYTES,
        max_entry_bytes: int = MAX_CACHED_CONFIG_BYTES,
    ) -> None:
        self._data: dict[K, tuple[V, int]] = {}
        self._max = max_entries
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_entry_bytes  # a bigger key is never kept
        self._bytes = 0
        self._lock = threading.Lock()  # on misses only: hits never take it

    def get(self, key: K) -> V | None:
        found = self._data.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V, size: int) -> V:
        if size > self._max_entry_bytes:
            return value
        with self._lock:
            data = self._data
            previous = data.pop(key, None)  # put again: its bytes counted once, as the newest
            if previous is not None:
                self._bytes -= previous[1]
            while data and (len(data) >= self._max or self._bytes + size > self._max_bytes):
                _, oldest_size = data.pop(next(iter(data)))
                self._bytes -= oldest_size
            data[key] = (value, size)
            self._bytes += size
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._data))

    def keys(self) -> list[K]:
        return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        return [(key, value) for key, (value, _) in self._data.items()]

    @property
    def held_bytes(self) -> int:
        return self._bytes
