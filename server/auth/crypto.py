"""AES-256-GCM encryption of BYOK provider keys under the `LLMGW_ENCRYPTION_KEY` passphrase.

Two record formats, told apart by their first characters (a v1 record is plain base64, whose
alphabet has no `$`):

  * v1 (seed-compatible, read only): base64(salt[16] | iv[12] | ciphertext | tag[16]), the AES
    key PBKDF2-HMAC-SHA256(passphrase, salt, 100,000), no associated data.
  * v2 (written today): `v2$` + base64(header | nonce[12] | ciphertext | tag[16]) with
    header = 0x02 | iterations (u32, big endian) | kdf_salt[16] | key_id[8].
    prk = PBKDF2-HMAC-SHA256(passphrase, kdf_salt, iterations) (600,000 by default, OWASP's
    figure); the AES key and the key id are HMAC-SHA256(prk, label) under two labels. The
    associated data is the header plus the record's organization, provider name and base URL,
    so a row copied onto another provider, organization or base URL does not decrypt, and a
    header edited in place (fewer iterations, another key id) does not either.

Why a kdf_salt per writing process and not per record: PBKDF2 at 600k costs ~0.4 s, and a
per-record salt would make every process pay that for every provider it ever reads. A process
draws one random kdf_salt per `Keyring` and writes all its records under it (fresh random nonce
each: 96-bit random nonces are safe far beyond any provider count), so readers derive once per
(passphrase, kdf_salt): a handful per deployment, and one after `keys rotate-encryption`.

Why the key id is derived from the prk and not from the passphrase alone: a fast fingerprint of
the passphrase (or one over a fixed salt) would let whoever holds the database test passphrase
guesses far cheaper than 600k iterations each, or precompute them once for every deployment.
Derived from the salted prk it costs an attacker exactly what the ciphertext already does; it
lets a reader that knows several passphrases (`LLMGW_ENCRYPTION_KEY` and
`LLMGW_ENCRYPTION_KEY_PREVIOUS`, during a rotation) tell "not one of my passphrases" from
"bound to another provider, or corrupt".

Derivations are cached (a process-wide LRU keyed by an HMAC of the passphrase under a random
per-process key, never the passphrase itself). `Keyring.decrypt_async`/`encrypt_async` run a
cache miss on PBKDF2's own two threads, one derivation per key at a time however many calls wait
for it, so the event loop never runs PBKDF2. Not on the loop's default executor: that one also
resolves host names (`loop.getaddrinfo`) for every upstream call, and a burst of derivations
(first reads of v1 rows, each with its own salt; rows with a large stored count) queued there
would stall every call's connect, BYOK or not.

Why v1 records can be refused (`LLMGW_BYOK_READ_V1=false`): they are bound to nothing, so whoever
can write the providers table could plant one (from a backup taken before the rotation, say) on
a provider whose base URL they chose, and the server would send the decrypted key there. Once
`keys rotate-encryption` has rewritten every row, no legitimate v1 record is left to read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import FailedPrecondition

if TYPE_CHECKING:
    from server.config import Settings

SALT_BYTES = 16
IV_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID_BYTES = 8
PBKDF2_ITERATIONS = 600_000
V1_ITERATIONS = 100_000
# A stored record names its own iteration count; one from a tampered row must not pin a worker
# thread for minutes, so counts beyond this are refused before any derivation.
MAX_ITERATIONS = 10_000_000
V2_PREFIX = "v2$"
_V2_VERSION = 2
_V2_HEADER = struct.Struct(">BI16s8s")  # version, iterations, kdf_salt, key_id
_AES_LABEL = b"llmgw/byok/aes-256-gcm/v2"
_KEY_ID_LABEL = b"llmgw/byok/key-id/v2"
_AAD_LABEL = b"llmgw/byok/binding/v2"
_CACHE_SIZE = 4096
# Cache identities are HMACs under this, so even a memory dump of the cache names no passphrase.
_PROCESS_SECRET = os.urandom(32)
# Threads are started on first use; two keep one slow derivation from delaying every other one
# while bounding the CPU a burst can take.
_KDF_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmgw-pbkdf2")


class EncryptionKeyMissing(FailedPrecondition):
    """No `LLMGW_ENCRYPTION_KEY` is configured, so BYOK keys can be neither stored nor read."""

    def __init__(self) -> None:
        super().__init__(
            "BYOK provider keys need LLMGW_ENCRYPTION_KEY to be set on the server "
            "(it encrypts them at rest); none is configured",
            metadata={"setting": "LLMGW_ENCRYPTION_KEY"},
        )


DecryptionCause = Literal["unknown_key", "binding", "mismatch", "malformed", "unbound"]
# Deliberately say nothing about the token or the passphrase.
_CAUSES: dict[DecryptionCause, str] = {
    "unknown_key": "a stored BYOK provider key was encrypted under a passphrase that is neither "
    "LLMGW_ENCRYPTION_KEY nor LLMGW_ENCRYPTION_KEY_PREVIOUS",
    "binding": "a stored BYOK provider key does not belong to this provider (its row was copied "
    "from another provider, organization or base URL) or the stored value is corrupt",
    "mismatch": "a stored BYOK provider key could not be decrypted: LLMGW_ENCRYPTION_KEY differs "
    "from the one it was stored with, or the stored value is corrupt",
    "malformed": "a stored BYOK provider key is not a valid encrypted record",
    # Not "rotate it": rotation would bind a planted row to the provider it was planted on.
    "unbound": "a stored BYOK provider key is an old-format record, bound to no provider, which "
    "this server refuses (LLMGW_BYOK_READ_V1=false); create the provider again with its key",
}


class DecryptionFailed(FailedPrecondition):
    """A stored key could not be decrypted: unknown passphrase, another binding, or an altered value."""

    def __init__(self, cause: DecryptionCause) -> None:
        setting = "LLMGW_BYOK_READ_V1" if cause == "unbound" else "LLMGW_ENCRYPTION_KEY"
        super().__init__(_CAUSES[cause], metadata={"setting": setting, "cause": cause})
        self.cause: DecryptionCause = cause


@dataclass(frozen=True, slots=True)
class Binding:
    """What a v2 record is bound to (AES-GCM associated data): its provider's identity."""

    organization_id: str
    provider_name: str
    base_url: str

    def associated_data(self, header: bytes) -> bytes:
        # Length-prefixed, so no two different bindings encode to the same bytes.
        parts = [_AAD_LABEL, header]
        parts += [value.encode() for value in (self.organization_id, self.provider_name, self.base_url)]
        return b"".join(struct.pack(">I", len(part)) + part for part in parts)


class _KeyCache:
    """A small thread-safe LRU of derived prks, keyed by (hmac(passphrase), salt, iterations)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ident: tuple[bytes, bytes, int]) -> bytes | None:
        with self._lock:
            key = self._items.get(ident)
            if key is not None:
                self._items.move_to_end(ident)
            return key

    def put(self, ident: tuple[bytes, bytes, int], key: bytes) -> None:
        with self._lock:
            self._items[ident] = key
            self._items.move_to_end(ident)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _KeyCache(_CACHE_SIZE)


def _ident(passphrase: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, int]:
    return hmac.digest(_PROCESS_SECRET, passphrase.encode(), "sha256"), salt, iterations


def _derive(passphrase: str, salt: bytes, iterations: int) -> bytes:
    ident = _ident(passphrase, salt, iterations)
    key = _cache.get(ident)
    if key is None:
        key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, iterations, KEY_BYTES)
        _cache.put(ident, key)
    return key


def _subkey(prk: bytes, label: bytes) -> bytes:
    return hmac.digest(prk, label, "sha256")


def _key_id(prk: bytes) -> bytes:
    return _subkey(prk, _KEY_ID_LABEL)[:KEY_ID_BYTES]


@dataclass(frozen=True, slots=True)
class _Record:
    version: int
    iterations: int
    kdf_salt: bytes
    key_id: bytes  # empty for v1
    header: bytes  # empty for v1
    nonce: bytes
    sealed: bytes  # ciphertext | tag


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecryptionFailed("malformed") from None


def _parse(token: str) -> _Record:
    if token.startswith(V2_PREFIX):
        raw = _b64(token[len(V2_PREFIX) :])
        if len(raw) < _V2_HEADER.size + IV_BYTES + TAG_BYTES:
            raise DecryptionFailed("malformed")
        version, iterations, kdf_salt, key_id = _V2_HEADER.unpack_from(raw)
        if version != _V2_VERSION or not 1 <= iterations <= MAX_ITERATIONS:
            raise DecryptionFailed("malformed")
        body = raw[_V2_HEADER.size :]
        return _Record(
            version=_V2_VERSION,
            iterations=iterations,
            kdf_salt=kdf_salt,
            key_id=key_id,
            header=raw[: _V2_HEADER.size],
            nonce=body[:IV_BYTES],
            sealed=body[IV_BYTES:],
        )
    if "$" in token:
        raise DecryptionFailed("malformed")  # a format version this build does not know
    raw = _b64(token)
    if len(raw) < SALT_BYTES + IV_BYTES + TAG_BYTES:
        raise DecryptionFailed("malformed")
    return _Record(
        version=1,
        iterations=V1_ITERATIONS,
        kdf_salt=raw[:SALT_BYTES],
        key_id=b"",
        header=b"",
        nonce=raw[SALT_BYTES : SALT_BYTES + IV_BYTES],
        sealed=raw[SALT_BYTES + IV_BYTES :],
    )


@dataclass(slots=True)
class Keyring:
    """The passphrases a process knows: `current` encrypts and is tried first; `previous` only decrypts.

    `iterations` is the PBKDF2 count of new records; lower it only in tests (the record stores its
    count, so a reader needs no setting to read it). `read_v1=False` refuses unbound v1 records
    (see the module docstring).
    """

    current: str = field(repr=False)
    previous: str = field(default="", repr=False)
    iterations: int = PBKDF2_ITERATIONS
    read_v1: bool = True
    _write_salt: bytes = field(default_factory=lambda: os.urandom(SALT_BYTES), init=False, repr=False)
    _inflight: dict[tuple[bytes, bytes, int], asyncio.Future[bytes]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"PBKDF2 iterations must be between 1 and {MAX_ITERATIONS}")

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        return cls(settings.encryption_key, settings.encryption_key_previous, read_v1=settings.byok_read_v1)

    @property
    def configured(self) -> bool:
        return bool(self.current)

    def _candidates(self) -> Sequence[str]:
        if not self.current and not self.previous:
            raise EncryptionKeyMissing()
        return [p for p in dict.fromkeys((self.current, self.previous)) if p]

    # --- writing ----------------------------------------------------------------------------

    def encrypt(self, plaintext: str, binding: Binding) -> str:
        """A v2 record of `plaintext` under the current passphrase, bound to `binding`."""
        if not self.current:
            raise EncryptionKeyMissing()
        return self._seal(_derive(self.current, self._write_salt, self.iterations), plaintext, binding)

    async def encrypt_async(self, plaintext: str, binding: Binding) -> str:
        """`encrypt`, deriving the write key (once per keyring) on the KDF threads."""
        if not self.current:
            raise EncryptionKeyMissing()
        prk = await self._derive_async(self.current, self._write_salt, self.iterations)
        return self._seal(prk, plaintext, binding)

    def _seal(self, prk: bytes, plaintext: str, binding: Binding) -> str:
        header = _V2_HEADER.pack(_V2_VERSION, self.iterations, self._write_salt, _key_id(prk))
        nonce = os.urandom(IV_BYTES)
        sealed = AESGCM(_subkey(prk, _AES_LABEL)).encrypt(
            nonce, plaintext.encode(), binding.associated_data(header)
        )
        return V2_PREFIX + base64.b64encode(header + nonce + sealed).decode("ascii")

    # --- reading ----------------------------------------------------------------------------

    def decrypt(self, token: str, binding: Binding) -> str:
        """The plaintext of a v1 or v2 record; raises `DecryptionFailed` (never naming a secret).

        Runs PBKDF2 on the calling thread when the key is not cached: `decrypt_async` on a loop.
        """
        candidates = self._candidates()
        record = self._readable(token)
        for passphrase in candidates:
            plain = _open_with(_derive(passphrase, record.kdf_salt, record.iterations), record, binding)
            if plain is not None:
                return plain
        raise _not_mine(record)

    async def decrypt_async(self, token: str, binding: Binding) -> str:
        """`decrypt`, running every PBKDF2 it needs on the KDF threads, never on the event loop."""
        candidates = self._candidates()
        record = self._readable(token)
        for passphrase in candidates:
            prk = await self._derive_async(passphrase, record.kdf_salt, record.iterations)
            plain = _open_with(prk, record, binding)
            if plain is not None:
                return plain
        raise _not_mine(record)

    def _readable(self, token: str) -> _Record:
        record = _parse(token)
        if record.version == 1 and not self.read_v1:
            raise DecryptionFailed("unbound")  # before any derivation: a planted row costs nothing
        return record

    def needs_rotation(self, token: str) -> bool:
        """True unless `token` is a v2 record under the current passphrase, count and write salt."""
        record = _parse(token)
        return not self._is_current(record) or record.kdf_salt != self._write_salt

    def adopt_write_salt(self, token: str) -> bool:
        """Write under `token`'s salt if it is a v2 record under the current passphrase and count.

        Rotation uses it so every row ends under one salt (a reader derives once, not once per
        writer) and a second run rewrites nothing.
        """
        record = _parse(token)
        if not self._is_current(record):
            return False
        self._write_salt = record.kdf_salt
        return True

    def _is_current(self, record: _Record) -> bool:
        if record.version != _V2_VERSION or record.iterations != self.iterations or not self.current:
            return False
        prk = _derive(self.current, record.kdf_salt, record.iterations)
        return hmac.compare_digest(_key_id(prk), record.key_id)

    async def _derive_async(self, passphrase: str, salt: bytes, iterations: int) -> bytes:
        """The prk itself, not "now cached": with more keys in use than cache slots, it may be
        evicted before the caller looks it up again."""
        ident = _ident(passphrase, salt, iterations)
        cached = _cache.get(ident)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(ident)
        if pending is None or pending.get_loop() is not loop:
            # One derivation per key, however many calls need it at once: they all wait for it
            # instead of each taking a KDF thread for ~0.4 s.
            pending = loop.run_in_executor(_KDF_EXECUTOR, _derive, passphrase, salt, iterations)
            self._inflight[ident] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(ident, None))
        # shield: a cancelled caller must not cancel the derivation others wait for.
        return await asyncio.shield(pending)


def _open_with(prk: bytes, record: _Record, binding: Binding) -> str | None:
    """The plaintext if `prk` is the record's key; None if the record is under another passphrase.

    A v2 record whose key id matches but whose tag does not is bound elsewhere (or corrupt): no
    other passphrase can open it, so that raises at once.
    """
    if record.version == 1:
        return _open(prk, record, None)
    if not hmac.compare_digest(_key_id(prk), record.key_id):
        return None
    plain = _open(_subkey(prk, _AES_LABEL), record, binding.associated_data(record.header))
    if plain is None:
        raise DecryptionFailed("binding")
    return plain


def _not_mine(record: _Record) -> DecryptionFailed:
    # A v1 record has no key id, so "another passphrase" and "corrupt" look the same.
    return DecryptionFailed("mismatch" if record.version == 1 else "unknown_key")


def _open(key: bytes, record: _Record, aad: bytes | None) -> str | None:
    try:
        return AESGCM(key).decrypt(record.nonce, record.sealed, aad).decode()
    except (InvalidTag, UnicodeDecodeError):
        return None


def clear_key_cache() -> None:
    """Forget every derived key (tests)."""
    _cache.clear()
