"""AES-256-GCM encryption of BYOK provider keys under the `LLMGW_ENCRYPTION_KEY` passphrase.

Format (seed-compatible): base64(salt[16] | iv[12] | ciphertext | tag[16]), the AES key derived
from the passphrase with PBKDF2-HMAC-SHA256, 100,000 iterations, over the token's own salt.

PBKDF2 at 100k iterations costs tens of milliseconds, so derived keys are cached per
(passphrase, salt): every stored provider has its own salt, and after the first use its key
decrypts in microseconds. `decrypt_async`/`encrypt_async` run a cache miss in a worker thread
so the event loop is never blocked by the derivation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import threading
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import FailedPrecondition

SALT_BYTES = 16
IV_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
PBKDF2_ITERATIONS = 100_000
_CACHE_SIZE = 4096


class EncryptionKeyMissing(FailedPrecondition):
    """No `LLMGW_ENCRYPTION_KEY` is configured, so BYOK keys can be neither stored nor read."""

    def __init__(self) -> None:
        super().__init__(
            "BYOK provider keys need LLMGW_ENCRYPTION_KEY to be set on the server "
            "(it encrypts them at rest); none is configured",
            metadata={"setting": "LLMGW_ENCRYPTION_KEY"},
        )


class DecryptionFailed(FailedPrecondition):
    """A stored key could not be decrypted: wrong passphrase, or the stored value was altered."""

    def __init__(self) -> None:
        # Deliberately says nothing about the token or the passphrase.
        super().__init__(
            "a stored BYOK provider key could not be decrypted: LLMGW_ENCRYPTION_KEY differs from "
            "the one it was stored with, or the stored value is corrupt",
            metadata={"setting": "LLMGW_ENCRYPTION_KEY"},
        )


class _KeyCache:
    """A small thread-safe LRU of derived AES keys, keyed by (sha256(passphrase), salt)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ident: tuple[bytes, bytes]) -> bytes | None:
        with self._lock:
            key = self._items.get(ident)
            if key is not None:
                self._items.move_to_end(ident)
            return key

    def put(self, ident: tuple[bytes, bytes], key: bytes) -> None:
        with self._lock:
            self._items[ident] = key
            self._items.move_to_end(ident)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _KeyCache(_CACHE_SIZE)


def _ident(passphrase: str, salt: bytes) -> tuple[bytes, bytes]:
    # The cache holds a digest of the passphrase, not the passphrase itself.
    return hashlib.sha256(passphrase.encode()).digest(), salt


def _derive(passphrase: str, salt: bytes) -> bytes:
    ident = _ident(passphrase, salt)
    key = _cache.get(ident)
    if key is None:
        key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, PBKDF2_ITERATIONS, KEY_BYTES)
        _cache.put(ident, key)
    return key


def _require(passphrase: str) -> None:
    if not passphrase:
        raise EncryptionKeyMissing()


def encrypt(plaintext: str, passphrase: str) -> str:
    """Encrypt `plaintext` under `passphrase` with a fresh salt and IV; returns base64 text."""
    _require(passphrase)
    salt = os.urandom(SALT_BYTES)
    iv = os.urandom(IV_BYTES)
    sealed = AESGCM(_derive(passphrase, salt)).encrypt(iv, plaintext.encode(), None)  # ct | tag
    return base64.b64encode(salt + iv + sealed).decode("ascii")


def _split(token: str) -> tuple[bytes, bytes, bytes]:
    try:
        raw = base64.b64decode(token.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecryptionFailed() from None
    if len(raw) < SALT_BYTES + IV_BYTES + TAG_BYTES:
        raise DecryptionFailed()
    return raw[:SALT_BYTES], raw[SALT_BYTES : SALT_BYTES + IV_BYTES], raw[SALT_BYTES + IV_BYTES :]


def decrypt(token: str, passphrase: str) -> str:
    """Decrypt a token made by `encrypt`; raises `DecryptionFailed` on a wrong passphrase or tampering."""
    _require(passphrase)
    salt, iv, sealed = _split(token)
    try:
        plain = AESGCM(_derive(passphrase, salt)).decrypt(iv, sealed, None)
        return plain.decode()
    except (InvalidTag, UnicodeDecodeError):
        # `from None`: the underlying exception adds nothing and must not chain into logs.
        raise DecryptionFailed() from None


def is_key_cached(token: str, passphrase: str) -> bool:
    """True when decrypting `token` needs no PBKDF2 derivation (cheap enough for the event loop)."""
    try:
        salt, _, _ = _split(token)
    except DecryptionFailed:
        return True  # fails fast, no derivation
    return _cache.get(_ident(passphrase, salt)) is not None


async def decrypt_async(token: str, passphrase: str) -> str:
    """`decrypt`, running a PBKDF2 cache miss in a worker thread instead of on the event loop."""
    _require(passphrase)
    if is_key_cached(token, passphrase):
        return decrypt(token, passphrase)
    return await asyncio.to_thread(decrypt, token, passphrase)


async def encrypt_async(plaintext: str, passphrase: str) -> str:
    """`encrypt` in a worker thread (a fresh salt always costs one PBKDF2 derivation)."""
    _require(passphrase)
    return await asyncio.to_thread(encrypt, plaintext, passphrase)


def clear_key_cache() -> None:
    """Forget every derived key (tests; or after rotating LLMGW_ENCRYPTION_KEY)."""
    _cache.clear()
