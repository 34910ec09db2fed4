"""BYOK providers end to end over the SQLite store (server.auth.byok)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.auth.byok import create_byok_provider, resolve_byok
from server.auth.crypto import DecryptionFailed, EncryptionKeyMissing, Keyring
from server.auth.endpoints import EndpointPolicy
from server.auth.redact import REDACTED, Redactor
from server.auth.store_sqlite import SqliteAuthStore
from server.errors import EndpointNotAllowed, InvalidRequest, NotFound

PASS = "byok-passphrase"
KEYRING = Keyring(PASS, iterations=1_000)
KEY = "sk-byok-customer-key-0123456789"
POLICY = EndpointPolicy(provider_base_urls=("https://api.openai.com/v1",))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteAuthStore]:
    async with SqliteAuthStore(path=str(tmp_path / "gw.db")) as s:
        yield s


async def test_store_and_resolve(store: SqliteAuthStore, tmp_path: Path) -> None:
    record = await create_byok_provider(
        store,
        POLICY,
        keyring=KEYRING,
        organization_id="acme",
        name="mine",
        endpoint_type="openai",
        base_url="https://LLM.example.com/v1/",
        api_key=KEY,
    )
    assert record.base_url == "https://llm.example.com/v1"
    assert record.api_key_last4 == "6789"
    assert KEY not in record.api_key_encrypted
    redactor = Redactor()
    creds = await resolve_byok(
        store, keyring=KEYRING, organization_id="acme", provider_name="mine", redactor=redactor
    )
    assert creds.api_key == KEY and creds.base_url == "https://llm.example.com/v1"
    assert KEY not in repr(creds)
    assert redactor.redact(f"x {KEY}") == f"x {REDACTED}"
    with pytest.raises(NotFound):
        await resolve_byok(store, keyring=KEYRING, organization_id="beta", provider_name="mine")
    with pytest.raises(DecryptionFailed):
        await resolve_byok(
            store, keyring=Keyring("wrong", iterations=1_000), organization_id="acme", provider_name="mine"
        )
    await store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("gw.db"))
    assert KEY.encode() not in raw
    await store.start()


async def test_needs_the_encryption_key(store: SqliteAuthStore) -> None:
    with pytest.raises(EncryptionKeyMissing, match="LLMGW_ENCRYPTION_KEY"):
        await create_byok_provider(
            store,
            POLICY,
            keyring=Keyring(""),
            organization_id="acme",
            name="mine",
            endpoint_type="openai",
            base_url="https://llm.example.com/v1",
            api_key=KEY,
        )


@pytest.mark.parametrize(
    ("base_url", "api_key", "error"),
    [
        ("http://169.254.169.254/", KEY, EndpointNotAllowed),
        ("http://127.0.0.1:8080/v1", KEY, EndpointNotAllowed),
        ("https://u:p@llm.example.com/v1", KEY, EndpointNotAllowed),
        ("", KEY, InvalidRequest),
        ("https://llm.example.com/v1", "", InvalidRequest),
    ],
)
async def test_rejected(store: SqliteAuthStore, base_url: str, api_key: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await create_byok_provider(
            store,
            POLICY,
            keyring=KEYRING,
            organization_id="acme",
            name="mine",
            endpoint_type="openai",
            base_url=base_url,
            api_key=api_key,
        )
    assert await store.list_providers(organization_id="acme") == []
