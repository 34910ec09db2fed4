"""Review of the BYOK-at-rest and revocation changes (issue 12, items 3 and 4), attacked.

Each test failed on the reviewed code (3c40acc):
  * PBKDF2 ran on the event loop's default executor, which also resolves host names
    (`loop.getaddrinfo`) for every upstream call: a burst of derivations (first reads of v1 rows,
    each with its own salt, or rows with a large stored count) stalled every call's connect.
  * With fewer cache slots than the (passphrase, salt) pairs in use, `decrypt_async` derived,
    found its key evicted, derived again, forever.
  * A v1 record is bound to nothing: whoever can write the providers table can copy one (from a
    backup taken before the rotation, say) onto any provider, and it decrypts there, so the key
    goes to the copier's base URL. `LLMGW_BYOK_READ_V1=false` refuses them once rotated.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.auth import crypto
from server.auth.byok import resolve_byok
from server.auth.crypto import Binding, DecryptionFailed, Keyring
from server.auth.store_sqlite import SqliteAuthStore
from server.config import load_settings

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


async def test_a_v1_row_copied_onto_another_provider_is_refused_once_v1_reading_is_off(
    tmp_path: Path,
) -> None:
    """The downgrade: an unbound v1 row (an old backup's) planted on a provider pointing elsewhere."""
    async with SqliteAuthStore(path=str(tmp_path / "gw.db")) as store:
        await store.create_provider(
            organization_id="evil",
            name="mine",
            endpoint_type="openai",
            base_url="https://collector.example.net/v1",
            api_key_encrypted=v1_record(SECRET, NEW),  # acme's row, before its rotation
            api_key_last4="",
        )
        reading = load_settings(environ={"LLMGW_ENCRYPTION_KEY": NEW})
        found = await resolve_byok(
            store, keyring=Keyring.from_settings(reading), organization_id="evil", provider_name="mine"
        )
        assert found.api_key == SECRET  # the documented default: v1 rows are read, bound to nothing

        refusing = load_settings(environ={"LLMGW_ENCRYPTION_KEY": NEW, "LLMGW_BYOK_READ_V1": "false"})
        with pytest.raises(DecryptionFailed) as info:
            await resolve_byok(
                store, keyring=Keyring.from_settings(refusing), organization_id="evil", provider_name="mine"
            )
    assert info.value.cause == "unbound" and info.value.metadata["setting"] == "LLMGW_BYOK_READ_V1"
    assert "LLMGW_BYOK_READ_V1" in info.value.message and SECRET not in info.value.message


def test_refusing_v1_still_reads_v2_and_costs_no_derivation(derivations: list[str]) -> None:
    keyring = Keyring(NEW, iterations=FAST, read_v1=False)
    token = keyring.encrypt(SECRET, BOUND)
    assert keyring.decrypt(token, BOUND) == SECRET
    planted = v1_record(SECRET, NEW)
    derivations.clear()
    with pytest.raises(DecryptionFailed) as info:
        keyring.decrypt(planted, BOUND)
    assert info.value.cause == "unbound" and derivations == []
