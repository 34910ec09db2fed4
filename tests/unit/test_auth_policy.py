"""LLMGW_AUTH decisions and metadata authentication (server.auth.policy)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server.auth.actor import ANONYMOUS, Actor
from server.auth.policy import (
    AuthConfigError,
    Authenticator,
    auth_mode_effective,
    auth_required,
    bearer_token,
    is_loopback_only,
    require_admin,
)
from server.auth.store_sqlite import SqliteAuthStore
from server.errors import PermissionDenied, Unauthenticated


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("unix:/tmp/gw.sock", True),
        ("127.0.0.1:1,[::1]:1", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("*:50051", False),
        ("10.1.2.3:50051", False),
        ("gateway.example.com:50051", False),
        ("127.0.0.1:1,0.0.0.0:2", False),
        ("", False),
    ],
)
def test_is_loopback_only(listen: str, expected: bool) -> None:
    assert is_loopback_only(listen) is expected


@pytest.mark.parametrize("has_keys", [True, False])
def test_required_is_always_on(has_keys: bool) -> None:
    assert auth_mode_effective("required", listen="127.0.0.1:1", has_keys=has_keys) is True
    assert auth_mode_effective("required", listen="0.0.0.0:1", has_keys=has_keys) is True


def test_off_is_off_with_a_warning_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert auth_mode_effective("off", listen="0.0.0.0:1", has_keys=False) is False
    assert "LLMGW_AUTH=off" in caplog.text


def test_auto_on_loopback_is_off_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert auth_mode_effective("auto", listen="127.0.0.1:50051", has_keys=True) is False
    assert "authentication is OFF" in caplog.text


def test_auto_beyond_loopback() -> None:
    assert auth_mode_effective("auto", listen="0.0.0.0:50051", has_keys=True) is True
    with pytest.raises(AuthConfigError, match="keys create.*LLMGW_AUTH=off"):
        auth_mode_effective("auto", listen="0.0.0.0:50051", has_keys=False)
    assert auth_required("auto", "0.0.0.0:1", has_keys=True) is True


def test_unknown_mode() -> None:
    with pytest.raises(AuthConfigError):
        auth_mode_effective("maybe", listen="127.0.0.1:1", has_keys=True)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("authorization", "bearer   abc  ")], "abc"),
        ([("x-other", "1"), ("authorization", b"Bearer abc")], "abc"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", "abc")], None),
        ([], None),
        (None, None),
    ],
)
def test_bearer_token(metadata: list[tuple[str, str | bytes]] | None, expected: str | None) -> None:
    assert bearer_token(metadata) == expected


def test_require_admin() -> None:
    require_admin(ANONYMOUS)
    with pytest.raises(PermissionDenied):
        require_admin(Actor(organization_id="acme", key_id="k"))


async def test_authenticator(tmp_path: Path) -> None:
    async with SqliteAuthStore(path=str(tmp_path / "a.db")) as store:
        key_id, plaintext = await store.create_key(organization_id="acme", user_id="u")
        auth = Authenticator(store, enabled=True)
        actor = await auth.actor([("authorization", f"Bearer {plaintext}")])
        assert (actor.organization_id, actor.user_id, actor.key_id) == ("acme", "u", key_id)
        with pytest.raises(Unauthenticated, match="missing"):
            await auth.actor([])
        with pytest.raises(Unauthenticated) as info:
            await auth.actor([("authorization", f"Bearer {plaintext}x")])
        assert plaintext not in info.value.message
        await store.revoke_key(key_id=key_id)
        with pytest.raises(Unauthenticated):
            await auth.actor([("authorization", f"Bearer {plaintext}")])
        off = Authenticator(store, enabled=False)
        assert await off.actor([("authorization", "Bearer junk")]) is ANONYMOUS
    assert ANONYMOUS.organization_id == "default" and ANONYMOUS.is_admin and ANONYMOUS.is_anonymous
