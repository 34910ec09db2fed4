"""AES-256-GCM encryption of BYOK keys (server.auth.crypto)."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.auth import crypto
from server.auth.crypto import DecryptionFailed, EncryptionKeyMissing, decrypt, decrypt_async, encrypt

PASS = "correct horse battery staple"
SECRET = "sk-test-0123456789abcdefghij"


def test_round_trip() -> None:
    token = encrypt(SECRET, PASS)
    assert decrypt(token, PASS) == SECRET
    assert SECRET not in token


def test_unicode_round_trip() -> None:
    assert decrypt(encrypt("ключ-🔑", PASS), PASS) == "ключ-🔑"


def test_format_salt_iv_ciphertext_tag() -> None:
    token = encrypt(SECRET, PASS)
    raw = base64.b64decode(token, validate=True)
    assert len(raw) == 16 + 12 + len(SECRET.encode()) + 16
    salt, iv, sealed = raw[:16], raw[16:28], raw[28:]
    # Independent re-derivation: PBKDF2-HMAC-SHA256, 100k iterations, 32-byte key.
    key = hashlib.pbkdf2_hmac("sha256", PASS.encode(), salt, 100_000, 32)
    assert AESGCM(key).decrypt(iv, sealed, None) == SECRET.encode()


def test_fresh_salt_and_iv_every_time() -> None:
    a, b = encrypt(SECRET, PASS), encrypt(SECRET, PASS)
    assert a != b
    assert base64.b64decode(a)[:28] != base64.b64decode(b)[:28]


def test_wrong_passphrase_is_a_clear_error_without_secrets() -> None:
    token = encrypt(SECRET, PASS)
    with pytest.raises(DecryptionFailed) as info:
        decrypt(token, "another passphrase")
    text = str(info.value) + repr(info.value.metadata)
    assert "LLMGW_ENCRYPTION_KEY" in text
    for leaked in (SECRET, PASS, "another passphrase", token):
        assert leaked not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("position", [0, 20, 30, -1])
def test_tampering_is_detected(position: int) -> None:
    raw = bytearray(base64.b64decode(encrypt(SECRET, PASS)))
    raw[position] ^= 0x01
    with pytest.raises(DecryptionFailed):
        decrypt(base64.b64encode(bytes(raw)).decode(), PASS)


@pytest.mark.parametrize("token", ["", "not base64!!", base64.b64encode(b"short").decode(), "é"])
def test_garbage_tokens(token: str) -> None:
    with pytest.raises(DecryptionFailed):
        decrypt(token, PASS)


def test_missing_passphrase_names_the_setting() -> None:
    with pytest.raises(EncryptionKeyMissing, match="LLMGW_ENCRYPTION_KEY"):
        encrypt(SECRET, "")
    with pytest.raises(EncryptionKeyMissing):
        decrypt(encrypt(SECRET, PASS), "")


def test_derived_keys_are_cached_per_salt() -> None:
    crypto.clear_key_cache()
    token = encrypt(SECRET, PASS)  # derivation cached for this salt
    assert crypto.is_key_cached(token, PASS)
    assert not crypto.is_key_cached(token, "other")
    start = time.perf_counter()
    for _ in range(200):
        decrypt(token, PASS)
    # 200 uncached PBKDF2 runs would take seconds.
    assert time.perf_counter() - start < 0.5


async def test_decrypt_async() -> None:
    crypto.clear_key_cache()
    token = encrypt(SECRET, PASS)
    crypto.clear_key_cache()
    assert await decrypt_async(token, PASS) == SECRET  # miss: runs in a thread
    assert await decrypt_async(token, PASS) == SECRET  # hit: inline
    assert await crypto.encrypt_async(SECRET, PASS) != token
