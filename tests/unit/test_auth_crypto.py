"""AES-256-GCM encryption of BYOK keys (server.auth.crypto); the v2 format details are in
tests/unit/test_hardening_byok_crypto.py."""

from __future__ import annotations

import base64
import hashlib

import pytest

from server.auth import crypto
from server.auth.crypto import Binding, DecryptionFailed, EncryptionKeyMissing, Keyring

PASS = "correct horse battery staple"
SECRET = "sk-test-0123456789abcdefghij"
BOUND = Binding(organization_id="acme", provider_name="p", base_url="https://llm.example.com/v1")
KEYRING = Keyring(PASS, iterations=1_000)  # the default (600k) is tested once, elsewhere


def test_round_trip() -> None:
    token = KEYRING.encrypt(SECRET, BOUND)
    assert KEYRING.decrypt(token, BOUND) == SECRET
    assert SECRET not in token


def test_unicode_round_trip() -> None:
    assert KEYRING.decrypt(KEYRING.encrypt("ключ-🔑", BOUND), BOUND) == "ключ-🔑"


def test_fresh_iv_every_time() -> None:
    a, b = KEYRING.encrypt(SECRET, BOUND), KEYRING.encrypt(SECRET, BOUND)
    assert a != b
    assert base64.b64decode(a[3:])[29:41] != base64.b64decode(b[3:])[29:41]


def test_wrong_passphrase_is_a_clear_error_without_secrets() -> None:
    token = KEYRING.encrypt(SECRET, BOUND)
    with pytest.raises(DecryptionFailed) as info:
        Keyring("another passphrase", iterations=1_000).decrypt(token, BOUND)
    text = str(info.value) + repr(info.value.metadata)
    assert "LLMGW_ENCRYPTION_KEY" in text
    for leaked in (SECRET, PASS, "another passphrase", token):
        assert leaked not in text
    assert info.value.__cause__ is None


@pytest.mark.parametrize("position", [0, 20, 30, -1])
def test_tampering_is_detected(position: int) -> None:
    raw = bytearray(base64.b64decode(KEYRING.encrypt(SECRET, BOUND)[3:]))
    raw[position] ^= 0x01
    with pytest.raises(DecryptionFailed):
        KEYRING.decrypt("v2$" + base64.b64encode(bytes(raw)).decode(), BOUND)


@pytest.mark.parametrize("token", ["", "not base64!!", base64.b64encode(b"short").decode(), "é"])
def test_garbage_tokens(token: str) -> None:
    with pytest.raises(DecryptionFailed):
        KEYRING.decrypt(token, BOUND)


def test_missing_passphrase_names_the_setting() -> None:
    with pytest.raises(EncryptionKeyMissing, match="LLMGW_ENCRYPTION_KEY"):
        Keyring("").encrypt(SECRET, BOUND)
    with pytest.raises(EncryptionKeyMissing):
        Keyring("").decrypt(KEYRING.encrypt(SECRET, BOUND), BOUND)


def test_derived_keys_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    crypto.clear_key_cache()
    token = KEYRING.encrypt(SECRET, BOUND)  # derivation cached for this keyring's salt
    runs: list[int] = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda *a: runs.append(1) or real(*a))
    assert KEYRING.decrypt(token, BOUND) == SECRET and runs == []
    with pytest.raises(DecryptionFailed):
        Keyring("other", iterations=1_000).decrypt(token, BOUND)
    assert runs == [1]


async def test_decrypt_async() -> None:
    token = KEYRING.encrypt(SECRET, BOUND)
    crypto.clear_key_cache()
    assert await KEYRING.decrypt_async(token, BOUND) == SECRET  # miss: runs in a thread
    assert await KEYRING.decrypt_async(token, BOUND) == SECRET  # hit: inline
    assert await KEYRING.encrypt_async(SECRET, BOUND) != token
