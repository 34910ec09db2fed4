"""Issue 12, item 5: the redactor stays bounded, drops a provider's key with it, and still finds
every known secret in every spelling at every position (the sampled index must not miss one).
Behaviour only; the cost is measured by `python -m bench.redaction_bench`."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from urllib.parse import quote

import pytest

from server.auth.byok import create_byok_provider, redaction_owner, resolve_byok
from server.auth.crypto import Keyring
from server.auth.endpoints import EndpointPolicy
from server.auth.redact import REDACTED, Redactor
from server.auth.store_sqlite import SqliteAuthStore
from server.config import Settings
from server.errors import NotFound

RNG = random.Random(5)
ALPHABET = string.ascii_letters + string.digits + "-_"


def _key(length: int, prefix: str = "") -> str:
    return prefix + "".join(RNG.choices(ALPHABET, k=length - len(prefix)))


# Lengths around every tier boundary of the index (8, 15, 23, 39 bytes) and long real shapes.
LENGTHS = (8, 9, 14, 15, 16, 22, 23, 24, 38, 39, 40, 51, 164)


@pytest.mark.parametrize("length", LENGTHS)
def test_every_secret_found_at_every_offset(length: int) -> None:
    secret = _key(length)
    redactor = Redactor([_key(40) for _ in range(50)])
    redactor.add_owned("p", secret)
    for offset in range(70):
        for filler in ("x", "é", "日"):  # 1-, 2- and 3-byte UTF-8 before it: byte alignment varies
            text = filler * offset + secret + " tail"
            assert redactor.redact_known(text) == filler * offset + REDACTED + " tail"
            assert secret not in redactor.redact(text)


def test_all_spellings_still_redacted() -> None:
    # URL-encoded (both ways) and JSON-escaped forms, as the old per-secret scan did.
    secret = 'byok/key+with=odd&chars"\\1234é'
    redactor = Redactor()
    redactor.add_owned("p", secret)
    for spelling in (secret, quote(secret, safe=""), quote(secret, safe="/"), json.dumps(secret)[1:-1]):
        assert redactor.redact_known(f"a {spelling} b") == f"a {REDACTED} b", spelling
    # A JSON document holding it (the trace's request JSON).
    assert secret not in json.loads(redactor.redact(json.dumps({"k": f"x{secret}y"})))["k"]


def test_many_secrets_in_one_text_and_a_secret_inside_another() -> None:
    keys = [_key(RNG.choice(LENGTHS)) for _ in range(300)]
    redactor = Redactor(keys[:10])
    for position, key in enumerate(keys[10:]):
        redactor.add_owned(f"o{position}", key)
    text = " | ".join(keys[::7])
    out = redactor.redact_known(text)
    assert all(k not in out for k in keys[::7]) and out.count(REDACTED) == len(keys[::7])
    nested = Redactor(["abcdefgh", "abcdefgh-ijklmnop"])
    assert nested.redact_known("[abcdefgh-ijklmnop]") == f"[{REDACTED}]"


def test_text_without_secrets_is_returned_unchanged() -> None:
    redactor = Redactor([_key(40) for _ in range(100)])
    text = json.dumps({"messages": [{"role": "user", "content": "lorem ipsum dolor sit amet 42 " * 300}]})
    assert redactor.redact_known(text) is text
    assert redactor.redact(text) == text


def test_replaced_key_leaves_and_deleted_owner_leaves() -> None:
    redactor = Redactor(["server-key-0123456789"])
    old, new = _key(45), _key(45)
    redactor.add_owned("org/p", old)
    assert old in redactor and redactor.redact_known(old) == REDACTED
    redactor.add_owned("org/p", new)  # the provider's key was replaced
    assert old not in redactor and redactor.redact_known(f"x {old}") == f"x {old}"
    assert redactor.redact_known(new) == REDACTED
    redactor.discard_owner("org/p")  # the provider was deleted
    assert new not in redactor and redactor.redact_known(new) == new
    assert "server-key-0123456789" in redactor and len(redactor) == 1  # server keys stay
    redactor.discard_owner("server-key-0123456789")
    assert redactor.redact_known("server-key-0123456789") == REDACTED


def test_a_key_shared_by_two_providers_stays_until_both_go() -> None:
    redactor = Redactor()
    key = _key(40)
    redactor.add_owned("a", key)
    redactor.add_owned("b", key)
    redactor.discard_owner("a")
    assert redactor.redact_known(key) == REDACTED
    redactor.discard_owner("b")
    assert redactor.redact_known(key) == key


def test_bounded_least_recently_used_dropped_first() -> None:
    redactor = Redactor(["pinned-server-key-123"], max_secrets=3)
    keys = [_key(40) for _ in range(5)]
    for position, key in enumerate(keys[:3]):
        redactor.add_owned(f"p{position}", key)
    redactor.add_owned("p0", keys[0])  # used again: now the most recent
    redactor.add_owned("p3", keys[3])
    redactor.add_owned("p4", keys[4])
    assert len(redactor) == 4  # three owned plus the pinned one
    assert [k in redactor for k in keys] == [True, False, False, True, True]
    assert "pinned-server-key-123" in redactor
    # Nothing of the dropped keys is left in the index (hold-back prefixes included).
    assert redactor.redact_known(keys[1]) == keys[1]
    assert redactor.hold_from(keys[1][:10]) == 10 or keys[1][:3] in (
        k[:3] for k in (keys[0], keys[3], keys[4])
    )


async def test_resolve_byok_replaces_and_drops_the_providers_key(tmp_path: Path) -> None:
    store = SqliteAuthStore(path=str(tmp_path / "gw.db"))
    await store.start()
    policy = EndpointPolicy.from_settings(Settings())
    redactor = Redactor()
    keyring = Keyring("pass-phrase-1", iterations=1_000)
    first, second = _key(44, "sk-"), _key(44, "sk-")

    async def create(key: str) -> None:
        await create_byok_provider(
            store,
            policy,
            keyring=keyring,
            organization_id="acme",
            name="mine",
            endpoint_type="openai",
            base_url="https://llm.example.com/v1",
            api_key=key,
        )

    async def resolve() -> None:
        await resolve_byok(
            store, keyring=keyring, organization_id="acme", provider_name="mine", redactor=redactor
        )

    await create(first)
    await resolve()
    assert first in redactor
    # Deleted and created again with a new key (how a key is replaced): the old one leaves.
    assert await store.delete_provider(organization_id="acme", name="mine")
    await create(second)
    await resolve()
    assert first not in redactor and second in redactor and len(redactor) == 1
    # Deleted (say by another replica): the next lookup finds nothing and drops the key.
    assert await store.delete_provider(organization_id="acme", name="mine")
    with pytest.raises(NotFound):
        await resolve()
    assert second not in redactor and len(redactor) == 0
    redactor.add_owned(redaction_owner("acme", "mine"), first)
    assert first in redactor
    await store.close()


def test_keys_sharing_windows_stay_findable_when_one_goes() -> None:
    # Same 40-character start ("sk-proj-..." keys share their first windows): the index entries
    # they share must keep the other key when one is dropped.
    common = _key(40, "sk-proj-")
    first, second, third = common + "AAAA1111", common + "BBBB2222", common + "CCCC3333"
    redactor = Redactor()
    for owner, key in (("a", first), ("b", second), ("c", third)):
        redactor.add_owned(owner, key)
    redactor.discard_owner("b")
    assert redactor.redact_known(f"x {first} {third} {second}") == f"x {REDACTED} {REDACTED} {second}"
    redactor.discard_owner("a")
    assert redactor.redact_known(f"{first}|{third}") == f"{first}|{REDACTED}"


def test_text_made_of_key_characters_still_finds_the_secret() -> None:
    # Base64-like text: nearly every sample could be a window (the path that looks every sample
    # up); the secret is still found at every alignment, and a text without it is left alone.
    secrets_ = [_key(40) for _ in range(200)]
    redactor = Redactor()
    for position, key in enumerate(secrets_):
        redactor.add_owned(str(position), key)
    noise = "".join(RNG.choices(ALPHABET, k=60_000))
    assert redactor.redact_known(noise) == noise
    for offset in range(0, 64, 7):
        text = noise[: 30_000 + offset] + secrets_[17] + noise[30_000 + offset :]
        assert redactor.redact_known(text) == noise[: 30_000 + offset] + REDACTED + noise[30_000 + offset :]
