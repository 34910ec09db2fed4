"""`llm-gateway keys` (server.auth.cli)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from server.auth.cli import add_keys_subparser, run_keys_command
from server.auth.store import parse_key_id
from server.auth.store_sqlite import SqliteAuthStore
from server.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway")
    add_keys_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(settings: Settings, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_keys_command(_parser().parse_args(argv), settings, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_create_list_revoke(tmp_path: Path) -> None:
    settings = Settings(sqlite_path=str(tmp_path / "gw.db"))
    code, out, _ = _run(settings, "keys", "create", "--org", "acme", "--admin", "--user", "ann")
    assert code == 0
    key = out.rstrip("\n").splitlines()[-1]
    key_id = parse_key_id(key)
    assert key_id is not None and key.startswith("llmgw_")

    code, out, _ = _run(settings, "keys", "list")
    assert code == 0
    assert key_id in out and "acme" in out and "ann" in out
    assert key not in out and key.split("_", 2)[2] not in out

    code, out, _ = _run(settings, "keys", "list", "--org", "other")
    assert key_id not in out

    code, out, _ = _run(settings, "keys", "revoke", key_id)
    assert code == 0 and "revoked" in out
    code, _, err = _run(settings, "keys", "revoke", key_id)
    assert code == 1 and "no active key" in err


async def test_created_key_authenticates(tmp_path: Path) -> None:
    settings = Settings(sqlite_path=str(tmp_path / "gw.db"))
    out, err = io.StringIO(), io.StringIO()
    from server.auth.cli import run_keys_command_async

    args = _parser().parse_args(["keys", "create", "--org", "acme"])
    assert await run_keys_command_async(args, settings, out=out, err=err) == 0
    key = out.getvalue().splitlines()[-1]
    async with SqliteAuthStore(path=settings.sqlite_path) as store:
        actor = await store.authenticate(token=key)
    assert actor is not None and actor.organization_id == "acme" and not actor.is_admin


def test_org_is_required() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["keys", "create"])


def test_empty_org_is_an_error(tmp_path: Path) -> None:
    code, _, err = _run(Settings(sqlite_path=str(tmp_path / "gw.db")), "keys", "create", "--org", "")
    assert code == 2 and "organization" in err


def test_store_flags_work_after_the_action(tmp_path: Path) -> None:
    """`keys create --org X --sqlite-path DB`, as documented, uses that store."""
    import subprocess
    import sys

    db = tmp_path / "after.db"
    created = subprocess.run(
        [sys.executable, "-m", "server", "keys", "create", "--org", "acme", "--sqlite-path", str(db)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("llmgw_")
    listed = subprocess.run(
        [sys.executable, "-m", "server", "keys", "list", "--sqlite-path", str(db)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert key.split("_")[1] in listed.stdout
    assert key not in listed.stdout
