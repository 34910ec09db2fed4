"""BYOK keys at rest through the real server and CLI (issue 12, item 3).

`llm-gateway keys rotate-encryption` runs as the operator runs it (a subprocess) while a server
holding both passphrases keeps answering; rows copied onto another provider fail with
FAILED_PRECONDITION; the rotation works the same on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import sqlite3
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.byok import binding_of, resolve_byok
from server.auth.crypto import Binding, DecryptionFailed, Keyring
from server.auth.store import AuthStore, ProviderRecord
from server.auth.store_postgres import PostgresAuthStore
from server.auth.store_sqlite import SqliteAuthStore
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.integration.test_security_e2e import (
    bearer,
    error_info,
    expect_error,
    make_key,
    run_cli,
    upstreams,
    wait_trace,
)
from tests.trace_services import PostgresServer, fresh_postgres_database

OLD = "old-passphrase-" + secrets.token_hex(8)
NEW = "new-passphrase-" + secrets.token_hex(8)
FAST = 1_000


def v1_record(plaintext: str, passphrase: str) -> str:
    """The format older gateways stored: base64(salt | iv | ciphertext | tag), 100k iterations."""
    salt, iv = secrets.token_bytes(16), secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, 100_000, 32)
    return base64.b64encode(salt + iv + AESGCM(key).encrypt(iv, plaintext.encode(), None)).decode()


async def add_provider(store: AuthStore, org: str, name: str, base_url: str, token: str) -> ProviderRecord:
    return await store.create_provider(
        organization_id=org,
        name=name,
        endpoint_type="openai",
        base_url=base_url,
        api_key_encrypted=token,
        api_key_last4="",
    )


async def seed_old_rows(store: AuthStore, base_url: str) -> dict[str, str]:
    """A v1 row and a v2 row under OLD, as a gateway before the rotation left them; name -> key."""
    keys = {name: f"sk-{name}-" + secrets.token_hex(12) for name in ("legacy", "older")}
    await add_provider(store, "org-a", "legacy", base_url, v1_record(keys["legacy"], OLD))
    binding = Binding(organization_id="org-a", provider_name="older", base_url=base_url)
    await add_provider(
        store, "org-a", "older", base_url, Keyring(OLD, iterations=FAST).encrypt(keys["older"], binding)
    )
    return keys


async def byok_call(gw: RunningGateway, name: str, key: str) -> chat_pb2.CreateResponse:
    config = chat_pb2.LLMConfig(
        model="gpt-4o-mini",
        model_endpoint_type="openai",
        provider_name=name,
        provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
        context_window=128000,
    )
    response: chat_pb2.CreateResponse = await gw.chat.Create(
        chat_request("", llm_config=config), metadata=bearer(key), timeout=20
    )
    return response


def rotate(db: Path, *extra: str, env: dict[str, str]) -> tuple[int, str, str]:
    done = run_cli(db, "rotate-encryption", *extra, env=env)
    return done.returncode, done.stdout, done.stderr


async def test_rotation_by_the_cli_while_a_server_with_both_passphrases_serves(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    _, user = await make_key(db, "org-a")
    async with upstreams(1) as (up,):
        up_url: str = up.base_url
        async with SqliteAuthStore(path=str(db)) as store:
            keys = await seed_old_rows(store, up_url)
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key=NEW,
            encryption_key_previous=OLD,
            allowed_endpoints=(up_url,),
        )
        async with running_gateway(settings) as gw:
            # Rolling restart done, rotation not yet run: both old rows are read.
            for name, key in keys.items():
                await byok_call(gw, name, user)
                assert up.requests[-1].headers["Authorization"] == f"Bearer {key}"

            env = {"LLMGW_ENCRYPTION_KEY": NEW, "LLMGW_ENCRYPTION_KEY_PREVIOUS": OLD}
            code, out, err = await asyncio.to_thread(rotate, db, env=env)
            assert code == 0, err
            assert "re-encrypted 2 provider keys, 0 already current" in out
            for text in (out, err):
                for secret in (OLD, NEW, *keys.values()):
                    assert secret not in text

            # The server that was running all along still answers, from its cache or the new rows.
            for name, key in keys.items():
                await byok_call(gw, name, user)
                assert up.requests[-1].headers["Authorization"] == f"Bearer {key}"

        async with SqliteAuthStore(path=str(db)) as store:
            records = await store.all_providers()
        assert {r.name for r in records} == set(keys)
        for record in records:
            assert record.api_key_encrypted.startswith("v2$")
            assert Keyring(NEW).decrypt(record.api_key_encrypted, binding_of(record)) == keys[record.name]
            with pytest.raises(DecryptionFailed):
                Keyring(OLD).decrypt(record.api_key_encrypted, binding_of(record))

        # Idempotent: a second run finds nothing to do.
        code, out, err = await asyncio.to_thread(rotate, db, env=env)
        assert code == 0 and "re-encrypted 0 provider keys, 2 already current" in out, out + err

        # After the rotation the previous passphrase can go: a server with only the new one serves.
        only_new = make_settings(tmp_path, auth="required", encryption_key=NEW, allowed_endpoints=(up_url,))
        async with running_gateway(only_new) as gw:
            for name, key in keys.items():
                await byok_call(gw, name, user)
                assert up.requests[-1].headers["Authorization"] == f"Bearer {key}"


async def test_a_row_copied_onto_another_provider_is_refused(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    _, other_admin = await make_key(db, "org-b", admin=True)
    byok_key = "sk-byok-" + secrets.token_hex(16)
    settings = make_settings(
        tmp_path, auth="required", encryption_key=NEW, allowed_endpoints=(upstream.base_url,)
    )
    async with running_gateway(settings) as gw:
        for key, name in ((admin, "mine"), (admin, "copy"), (other_admin, "theirs")):
            request = providers_pb2.CreateProviderRequest(
                name=name,
                model_endpoint_type="openai",
                base_url=upstream.base_url,
                api_key=byok_key if name == "mine" else f"sk-{name}-" + secrets.token_hex(8),
            )
            await gw.providers.CreateProvider(request, metadata=bearer(key), timeout=20)
        # An attacker with write access to the table copies org-a's "mine" row onto the others.
        with sqlite3.connect(db) as conn:
            (token,) = conn.execute("SELECT api_key_encrypted FROM providers WHERE name = 'mine'").fetchone()
            conn.execute(
                "UPDATE providers SET api_key_encrypted = ? WHERE name IN ('copy', 'theirs')", (token,)
            )
        # No lookup has cached these organizations' providers since they were created (a create
        # clears the cache), so the next calls read the copied rows.
        for key, name in ((admin, "copy"), (other_admin, "theirs")):
            config = chat_pb2.LLMConfig(
                model="gpt-4o-mini",
                model_endpoint_type="openai",
                provider_name=name,
                provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
                context_window=128000,
            )
            error = await expect_error(
                gw.chat.Create(chat_request("", llm_config=config), metadata=bearer(key), timeout=20)
            )
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info(error)
            assert info.reason == "FAILED_PRECONDITION" and info.metadata["cause"] == "binding"
            assert byok_key not in str(error.details())
        assert upstream.requests == []  # the copied key was never sent anywhere


async def test_rotation_names_rows_it_cannot_read_and_leaves_them(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    async with SqliteAuthStore(path=str(db)) as store:
        await seed_old_rows(store, "https://llm.example.com/v1")
        stranger = Keyring("a-third-passphrase-0123", iterations=FAST)
        binding = Binding(
            organization_id="org-c", provider_name="lost", base_url="https://llm.example.com/v1"
        )
        lost = await add_provider(
            store, "org-c", "lost", binding.base_url, stranger.encrypt("sk-lost-key-0123", binding)
        )
    env = {"LLMGW_ENCRYPTION_KEY": NEW, "LLMGW_ENCRYPTION_KEY_PREVIOUS": OLD}
    code, out, err = await asyncio.to_thread(rotate, db, env=env)
    assert code == 1
    assert "re-encrypted 2 provider keys" in out and "1 failed" in out
    assert "'lost' of organization 'org-c'" in err and "sk-lost-key-0123" not in err + out
    async with SqliteAuthStore(path=str(db)) as store:
        (still,) = [r for r in await store.all_providers() if r.name == "lost"]
    assert still.api_key_encrypted == lost.api_key_encrypted

    code, _, err = await asyncio.to_thread(rotate, db, env={"LLMGW_ENCRYPTION_KEY_PREVIOUS": OLD})
    assert code == 2 and "LLMGW_ENCRYPTION_KEY" in err


@pytest.mark.slow
async def test_rotation_on_postgres(tmp_path: Path, postgres_server: PostgresServer) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    async with PostgresAuthStore(dsn=dsn) as store:
        keys = await seed_old_rows(store, "https://llm.example.com/v1")
    env = {"LLMGW_ENCRYPTION_KEY": NEW, "LLMGW_ENCRYPTION_KEY_PREVIOUS": OLD}
    code, out, err = await asyncio.to_thread(
        rotate, tmp_path / "unused.db", "--postgres-dsn", dsn, "--key-store", "postgres", env=env
    )
    assert code == 0 and "re-encrypted 2 provider keys" in out, out + err
    async with PostgresAuthStore(dsn=dsn) as store:
        for name, key in keys.items():
            found = await resolve_byok(
                store, keyring=Keyring(NEW), organization_id="org-a", provider_name=name
            )
            assert found.api_key == key and found.provider.api_key_encrypted.startswith("v2$")
        with pytest.raises(DecryptionFailed):
            await resolve_byok(store, keyring=Keyring(OLD), organization_id="org-a", provider_name="legacy")
    assert not (tmp_path / "unused.db").exists()


async def test_the_previous_passphrase_is_scrubbed_like_the_current_one(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(
        tmp_path, encryption_key=NEW, encryption_key_previous=OLD, allowed_endpoints=(upstream.base_url,)
    )
    async with running_gateway(settings) as gw:
        request = chat_request(
            upstream.base_url,
            (chat_pb2.ROLE_USER, f"the old one was {OLD} and the new one {NEW}"),
            trace=chat_pb2.TraceContext(step_id="scrub-step"),
        )
        await gw.chat.Create(request, timeout=20)
        trace = await wait_trace(gw.traces, "scrub-step")
    text = json_format.MessageToJson(trace)
    assert "the old one was" in text
    assert OLD not in text and NEW not in text
