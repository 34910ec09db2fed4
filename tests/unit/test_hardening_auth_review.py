"""Review of the BYOK-at-rest and revocation changes (issue 12, items 3 and 4), attacked.

Each test failed on the reviewed code (3c40acc):
  * PBKDF2 ran on the event loop's default executor, which also resolves host names
    (`loop.getaddrinfo`) for every upstream call: a burst of derivations (first reads of v1 rows,
    each with its own salt, or rows with a large stored count) stalled every call's connect.
  * With fewer cache slots than the (passphrase, salt) pairs in use, `decrypt_async` derived,
    found its key evicted, derived again, forever.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.auth import crypto
from server.auth.crypto import Binding, Keyring

OLD = "old passphrase 0123456789"
NEW = "new passphrase 9876543210"
SECRET = "sk-byok-0123456789abcdefghij"
BOUND = Binding(organization_id="acme", provider_name="mine", base_url="https://llm.example.com/v1")
FAST = 1_000


def v1_record(plaintext: str, passphrase: str, salt: bytes = b"s" * 16) -> str:
    iv = b"i" * 12
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, 100_000, 32)
    return base64.b64encode(salt + iv + AESGCM(key).encrypt(iv, plaintext.encode(), None)).decode()


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    crypto.clear_key_cache()
    yield
    crypto.clear_key_cache()


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread name of every PBKDF2 run."""
    seen: list[str] = []
    real: Callable[..., bytes] = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None) -> bytes:
        seen.append(threading.current_thread().name)
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    return seen


async def test_derivation_needs_no_thread_of_the_default_executor() -> None:
    """Host-name resolution lives on the default executor; PBKDF2 must neither use nor wait for it."""
    token = Keyring(NEW, iterations=FAST).encrypt(SECRET, BOUND)
    crypto.clear_key_cache()
    loop = asyncio.get_running_loop()
    busy = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(busy)
    release = threading.Event()
    blocker = loop.run_in_executor(None, release.wait)  # every default thread taken
    try:
        plain = await asyncio.wait_for(Keyring(NEW).decrypt_async(token, BOUND), 10)
    finally:
        release.set()
        await blocker
    assert plain == SECRET


async def test_a_derivation_burst_leaves_the_default_executor_free(derivations: list[str]) -> None:
    """Twelve first reads of v1 rows (one salt each) under the previous passphrase: 24 derivations."""
    tokens = [v1_record(f"{SECRET}-{i}", OLD, salt=bytes([i]) * 16) for i in range(12)]
    derivations.clear()
    reader = Keyring(NEW, OLD)
    loop = asyncio.get_running_loop()
    reads = asyncio.gather(*(reader.decrypt_async(t, BOUND) for t in tokens))
    await asyncio.sleep(0.05)  # the burst has started
    resolved = await asyncio.wait_for(loop.run_in_executor(None, lambda: threading.current_thread().name), 10)
    assert not reads.done()  # the default executor answered while derivations were still queued
    assert await reads == [f"{SECRET}-{i}" for i in range(12)]
    assert len(derivations) == 24 and resolved not in derivations


async def test_decrypt_async_ends_even_when_the_cache_cannot_hold_both_passphrases(
    monkeypatch: pytest.MonkeyPatch, derivations: list[str]
) -> None:
    monkeypatch.setattr(crypto, "_cache", crypto._KeyCache(1))
    token = v1_record(SECRET, OLD)
    derivations.clear()
    plain = await asyncio.wait_for(Keyring(NEW, OLD).decrypt_async(token, BOUND), 10)
    assert plain == SECRET
    assert len(derivations) == 2  # current, then previous; never one on the loop's thread
    assert threading.current_thread().name not in derivations
