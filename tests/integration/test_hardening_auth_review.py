"""Review of issue 12 items 3 and 4 through the real CLI: after a rotation the operator is told to
refuse unbound v1 records (then a planted one is named, not decrypted); a whole key given to
`keys revoke` revokes it and is never echoed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.auth.crypto import Binding
from server.auth.store_sqlite import SqliteAuthStore
from tests.integration.test_security_e2e import make_key, run_cli

NEW = "new passphrase 9876543210"
SECRET = "sk-byok-0123456789abcdefghij"
BOUND = Binding(organization_id="acme", provider_name="legacy", base_url="https://llm.example.com/v1")


def v1_record(plaintext: str, passphrase: str) -> str:
    salt, iv = b"s" * 16, b"i" * 12
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, 100_000, 32)
    return base64.b64encode(salt + iv + AESGCM(key).encrypt(iv, plaintext.encode(), None)).decode()


def test_the_cli_says_when_v1_records_can_be_refused_and_then_names_a_planted_one(tmp_path: Path) -> None:
    """The real CLI, as the operator runs it: rotation upgrades the v1 row, then says what to set."""
    db = tmp_path / "gateway.db"

    async def plant(name: str) -> None:
        async with SqliteAuthStore(path=str(db)) as store:
            await store.create_provider(
                organization_id="acme",
                name=name,
                endpoint_type="openai",
                base_url=BOUND.base_url,
                api_key_encrypted=v1_record(SECRET, NEW),
                api_key_last4="",
            )

    asyncio.run(plant("legacy"))
    env = {"LLMGW_ENCRYPTION_KEY": NEW}
    done = run_cli(db, "rotate-encryption", env=env)
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 1 provider keys" in done.stdout and "LLMGW_BYOK_READ_V1=false" in done.stdout

    asyncio.run(plant("planted"))
    done = run_cli(db, "rotate-encryption", env={**env, "LLMGW_BYOK_READ_V1": "false"})
    assert done.returncode == 1
    assert "'planted' of organization 'acme': unbound" in done.stderr
    assert "LLMGW_BYOK_READ_V1=false" not in done.stdout and SECRET not in done.stdout + done.stderr


def test_revoking_with_the_whole_key_revokes_it_and_never_echoes_the_secret(tmp_path: Path) -> None:
    """A careless operator pastes the key instead of its id (in a CI job, whose log is kept)."""
    db = tmp_path / "gateway.db"
    key_id, key = asyncio.run(make_key(db, "acme"))
    done = run_cli(db, "revoke", key)
    assert done.returncode == 0, done.stderr
    assert key_id in done.stdout and key not in done.stdout + done.stderr

    async def authenticated() -> bool:
        async with SqliteAuthStore(path=str(db)) as store:
            return await store.authenticate(token=key) is not None

    assert not asyncio.run(authenticated())
