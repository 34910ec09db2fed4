"""BYOK keys at rest (issue 12, item 3): the v2 record format, its binding, old records, two passphrases.

Every test but the first uses a low PBKDF2 count (the explicit `iterations` parameter) so the
suite stays fast; the first checks the 600,000 default once, by re-deriving independently.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.auth import crypto
from server.auth.byok import binding_of, rotate_encryption
from server.auth.crypto import Binding, DecryptionFailed, EncryptionKeyMissing, Keyring
from server.auth.store_sqlite import SqliteAuthStore

OLD = "old passphrase 0123456789"
NEW = "new passphrase 9876543210"
SECRET = "sk-byok-0123456789abcdefghij"
BOUND = Binding(organization_id="acme", provider_name="mine", base_url="https://llm.example.com/v1")
FAST = 1_000


def v1_record(plaintext: str, passphrase: str) -> str:
    """What the seed and earlier gateways stored: base64(salt | iv | ciphertext | tag), 100k, no AAD."""
    salt, iv = b"s" * 16, b"i" * 12
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, 100_000, 32)
    return base64.b64encode(salt + iv + AESGCM(key).encrypt(iv, plaintext.encode(), None)).decode()


def aad(header: bytes, binding: Binding) -> bytes:
    parts = [b"llmgw/byok/binding/v2", header]
    parts += [v.encode() for v in (binding.organization_id, binding.provider_name, binding.base_url)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    crypto.clear_key_cache()
    yield
    crypto.clear_key_cache()


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Every PBKDF2 run as (iterations, thread name)."""
    seen: list[tuple[int, str]] = []
    real: Callable[..., bytes] = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None) -> bytes:
        seen.append((iterations, threading.current_thread().name))
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    return seen


def test_new_records_are_v2_at_600k_iterations_bound_to_their_provider() -> None:
    token = Keyring(NEW).encrypt(SECRET, BOUND)
    assert token.startswith("v2$") and SECRET not in token
    raw = base64.b64decode(token[3:], validate=True)
    header, nonce, sealed = raw[:29], raw[29:41], raw[41:]
    version, iterations, kdf_salt, key_id = struct.unpack(">BI16s8s", header)
    assert (version, iterations) == (2, 600_000)
    # Independent re-derivation from the documented format.
    prk = hashlib.pbkdf2_hmac("sha256", NEW.encode(), kdf_salt, 600_000, 32)
    assert key_id == hmac.digest(prk, b"llmgw/byok/key-id/v2", "sha256")[:8]
    aes = hmac.digest(prk, b"llmgw/byok/aes-256-gcm/v2", "sha256")
    assert AESGCM(aes).decrypt(nonce, sealed, aad(header, BOUND)) == SECRET.encode()
    assert Keyring(NEW).decrypt(token, BOUND) == SECRET


def test_old_v1_records_are_still_read() -> None:
    token = v1_record(SECRET, OLD)
    assert Keyring(OLD, iterations=FAST).decrypt(token, BOUND) == SECRET
    assert Keyring(NEW, OLD, iterations=FAST).decrypt(token, BOUND) == SECRET  # via the previous one
    with pytest.raises(DecryptionFailed):
        Keyring(NEW, iterations=FAST).decrypt(token, BOUND)


@pytest.mark.parametrize(
    "other",
    [
        Binding("beta", "mine", "https://llm.example.com/v1"),
        Binding("acme", "theirs", "https://llm.example.com/v1"),
        Binding("acme", "mine", "https://evil.example.com/v1"),
        Binding("", "mine", "https://llm.example.com/v1"),
    ],
)
def test_a_row_copied_onto_another_provider_does_not_decrypt(other: Binding) -> None:
    keyring = Keyring(NEW, iterations=FAST)
    token = keyring.encrypt(SECRET, BOUND)
    with pytest.raises(DecryptionFailed) as info:
        keyring.decrypt(token, other)
    assert info.value.cause == "binding"
    text = info.value.message + repr(info.value.metadata)
    for leaked in (SECRET, NEW, token):
        assert leaked not in text
    assert keyring.decrypt(token, BOUND) == SECRET


def test_an_edited_header_does_not_decrypt() -> None:
    keyring = Keyring(NEW, iterations=FAST)
    raw = bytearray(base64.b64decode(keyring.encrypt(SECRET, BOUND)[3:]))
    for position in (1, 4, 5, 21, 28, 30, len(raw) - 1):  # iterations, salt, key id, nonce, tag
        edited = bytearray(raw)
        edited[position] ^= 0x01
        with pytest.raises(DecryptionFailed):
            keyring.decrypt("v2$" + base64.b64encode(bytes(edited)).decode(), BOUND)


def test_an_absurd_iteration_count_is_refused_before_any_derivation(
    derivations: list[tuple[int, str]],
) -> None:
    keyring = Keyring(NEW, iterations=FAST)
    raw = bytearray(base64.b64decode(keyring.encrypt(SECRET, BOUND)[3:]))
    raw[1:5] = struct.pack(">I", 2**31)
    derivations.clear()
    token = "v2$" + base64.b64encode(bytes(raw)).decode()
    with pytest.raises(DecryptionFailed) as info:
        keyring.decrypt(token, BOUND)
    assert info.value.cause == "malformed" and derivations == []


@pytest.mark.parametrize("token", ["", "v2$", "v2$!!", "v9$AAAA", "not base64!!", "é", "v2$" + "A" * 40])
def test_garbage_is_malformed(token: str) -> None:
    with pytest.raises(DecryptionFailed):
        Keyring(NEW, iterations=FAST).decrypt(token, BOUND)


def test_previous_passphrase_reads_but_never_writes() -> None:
    old_token = Keyring(OLD, iterations=FAST).encrypt(SECRET, BOUND)
    rotating = Keyring(NEW, OLD, iterations=FAST)
    assert rotating.decrypt(old_token, BOUND) == SECRET
    new_token = rotating.encrypt(SECRET, BOUND)
    assert Keyring(NEW, iterations=FAST).decrypt(new_token, BOUND) == SECRET
    with pytest.raises(DecryptionFailed) as info:
        Keyring(OLD, iterations=FAST).decrypt(new_token, BOUND)
    assert info.value.cause == "unknown_key"  # told apart from a copied row by the key id
    # Before a rotation, servers may accept the next passphrase while still writing the old one.
    assert Keyring(OLD, NEW, iterations=FAST).decrypt(new_token, BOUND) == SECRET


def test_needs_rotation() -> None:
    rotating = Keyring(NEW, OLD, iterations=FAST)
    assert rotating.needs_rotation(v1_record(SECRET, OLD))
    assert rotating.needs_rotation(Keyring(OLD, iterations=FAST).encrypt(SECRET, BOUND))
    assert not rotating.needs_rotation(rotating.encrypt(SECRET, BOUND))
    assert Keyring(NEW, iterations=FAST + 1).needs_rotation(rotating.encrypt(SECRET, BOUND))


def test_no_passphrase_names_the_setting() -> None:
    with pytest.raises(EncryptionKeyMissing, match="LLMGW_ENCRYPTION_KEY"):
        Keyring("").encrypt(SECRET, BOUND)
    with pytest.raises(EncryptionKeyMissing):
        Keyring("").decrypt(Keyring(NEW, iterations=FAST).encrypt(SECRET, BOUND), BOUND)
    assert NEW not in repr(Keyring(NEW, OLD)) and OLD not in repr(Keyring(NEW, OLD))


def test_one_derivation_per_writer_not_per_record(derivations: list[tuple[int, str]]) -> None:
    writer = Keyring(NEW, iterations=FAST)
    tokens = [writer.encrypt(f"{SECRET}-{i}", BOUND) for i in range(50)]
    assert len(set(tokens)) == 50
    crypto.clear_key_cache()
    derivations.clear()
    reader = Keyring(NEW, iterations=FAST)
    assert [reader.decrypt(t, BOUND) for t in tokens] == [f"{SECRET}-{i}" for i in range(50)]
    assert len(derivations) == 1


async def test_concurrent_reads_derive_once_and_off_the_event_loop(
    derivations: list[tuple[int, str]],
) -> None:
    token = Keyring(OLD, iterations=FAST).encrypt(SECRET, BOUND)
    crypto.clear_key_cache()
    derivations.clear()
    reader = Keyring(NEW, OLD, iterations=FAST)
    results = await asyncio.gather(*(reader.decrypt_async(token, BOUND) for _ in range(20)))
    assert results == [SECRET] * 20
    # One derivation per passphrase tried (the current one first, then the previous), not per call.
    assert len(derivations) == 2
    loop_thread = threading.current_thread().name
    assert all(name != loop_thread for _, name in derivations)
    derivations.clear()
    assert await reader.decrypt_async(token, BOUND) == SECRET
    assert derivations == []


async def test_a_cancelled_reader_does_not_cancel_the_derivation_others_wait_for() -> None:
    token = Keyring(NEW, iterations=100 * FAST).encrypt(SECRET, BOUND)
    crypto.clear_key_cache()
    reader = Keyring(NEW)
    first = asyncio.create_task(reader.decrypt_async(token, BOUND))  # 100k: still running below
    second = asyncio.create_task(reader.decrypt_async(token, BOUND))
    await asyncio.sleep(0)
    first.cancel()
    assert await asyncio.wait_for(second, 10) == SECRET
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_rotation_leaves_every_row_under_one_salt_and_a_second_run_is_a_no_op(
    tmp_path: Path, derivations: list[tuple[int, str]]
) -> None:
    """Rows written by several server processes (one salt each) end under one: one derivation per reader."""
    async with SqliteAuthStore(path=str(tmp_path / "gw.db")) as store:
        for i in range(3):
            binding = Binding(organization_id="acme", provider_name=f"p{i}", base_url=BOUND.base_url)
            writer = Keyring(NEW, iterations=FAST)  # a fresh process: a fresh salt
            await store.create_provider(
                organization_id="acme",
                name=f"p{i}",
                endpoint_type="openai",
                base_url=BOUND.base_url,
                api_key_encrypted=writer.encrypt(f"{SECRET}-{i}", binding),
                api_key_last4="",
            )
        report = await rotate_encryption(store, Keyring(NEW, iterations=FAST))
        assert (report.rotated, report.unchanged, report.failed) == (2, 1, [])
        again = await rotate_encryption(store, Keyring(NEW, iterations=FAST))
        assert (again.rotated, again.unchanged) == (0, 3)
        crypto.clear_key_cache()
        derivations.clear()
        reader = Keyring(NEW, iterations=FAST)
        for record in await store.all_providers():
            assert reader.decrypt(record.api_key_encrypted, binding_of(record)).startswith(SECRET)
        assert len(derivations) == 1
