"""`llm-gateway keys create|list|revoke|rotate-encryption`: key management against the configured store.

`rotate-encryption` re-encrypts every BYOK provider key under `LLMGW_ENCRYPTION_KEY` (the new
passphrase), reading each with it or with `LLMGW_ENCRYPTION_KEY_PREVIOUS` (the old one); both
also as `--encryption-key` / `--encryption-key-previous`, but the environment keeps them out of
the process list.

Hook-up from `server/cli.py`:

    keys = add_keys_subparser(subparsers)
    config.add_arguments(keys)                # --sqlite-path, --postgres-dsn, ... for the store
    ...
    if args.command == "keys":
        return run_keys_command(args, load_settings(args))
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from server.auth.byok import rotate_encryption
from server.auth.crypto import Keyring
from server.auth.factory import create_auth_store, key_store_location, stranded_keys
from server.auth.redact import redact_text
from server.auth.store import DEFAULT_CACHE_TTL, parse_key_id
from server.errors import GatewayError
from server.limits.cli import add_limits_parser, run_limits

if TYPE_CHECKING:
    from server.auth.store import AuthStore
    from server.config import Settings


def add_keys_subparser(
    subparsers: Any, add_settings: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add `keys` (create/list/revoke) to an argparse subparsers object; returns the `keys` parser.

    `add_settings` adds the server's settings flags to each action, so the store can be chosen
    after the action too (`keys create --org X --sqlite-path DB`).
    """
    keys: argparse.ArgumentParser = subparsers.add_parser("keys", help="manage gateway keys")
    actions = keys.add_subparsers(
        dest="keys_command", required=True, metavar="{create,list,revoke,rotate-encryption,limits}"
    )

    create = actions.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("--org", required=True, help="organization the key acts for")
    create.add_argument("--user", default="", help="user id recorded on the key's calls")
    create.add_argument("--admin", action="store_true", help="may manage BYOK providers")

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--org", default=None, help="only this organization's keys")

    revoke = actions.add_parser("revoke", help="revoke a key by its id (or the key itself)")
    revoke.add_argument("key_id")

    rotate = actions.add_parser(
        "rotate-encryption",
        help="re-encrypt every BYOK provider key under LLMGW_ENCRYPTION_KEY, reading with it or "
        "LLMGW_ENCRYPTION_KEY_PREVIOUS",
    )
    limits = add_limits_parser(actions)  # server.limits.cli
    if add_settings is not None:
        for action in (create, listing, revoke, rotate, limits):
            add_settings(action)
    return keys


def run_keys_command(
    args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run a parsed `keys` command; returns the process exit code."""
    return asyncio.run(run_keys_command_async(args, settings, out=out, err=err))


async def run_keys_command_async(
    args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`run_keys_command` for callers already inside an event loop."""
    out = out or sys.stdout
    err = err or sys.stderr
    store = create_auth_store(settings, cache_ttl=DEFAULT_CACHE_TTL)
    try:
        try:
            await store.start()
        except Exception as exc:  # noqa: BLE001 - any driver error: one line for the operator, not a traceback
            reason = redact_text(str(exc) or type(exc).__name__, settings.postgres_dsn)
            print(f"error: cannot open the key store {key_store_location(settings)}: {reason}", file=err)
            return 1
        # On stderr: stdout stays parseable (`keys create` prints the key alone on its last line).
        print(f"key store: {key_store_location(settings)}", file=err)
        stranded = await stranded_keys(settings, store)
        if stranded is not None:
            print(f"warning: {stranded[0]}", file=err)
        command = args.keys_command
        if command == "create":
            key_id, plaintext = await store.create_key(
                organization_id=args.org, user_id=args.user, is_admin=args.admin
            )
            role = "admin" if args.admin else "non-admin"
            user = f", user {args.user!r}" if args.user else ""
            print(f"created {role} key {key_id} for organization {args.org!r}{user}", file=out)
            print(
                "store it now, it is not shown again; callers send `authorization: Bearer <key>`:", file=out
            )
            print(plaintext, file=out)
            return 0
        if command == "list":
            keys = await store.list_keys(organization_id=args.org)
            print("KEY_ID\tORGANIZATION\tUSER\tADMIN\tCREATED\tREVOKED", file=out)
            for key in keys:
                revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
                created = key.created_at.isoformat(timespec="seconds")
                admin = "yes" if key.is_admin else "no"
                row = (key.key_id, key.organization_id, key.user_id or "-", admin, created, revoked)
                print("\t".join(row), file=out)
            return 0
        if command == "revoke":
            # A whole key pasted instead of its id: revoke it by its id, and never echo the secret.
            key_id = parse_key_id(args.key_id) or args.key_id
            if await store.revoke_key(key_id=key_id):
                print(
                    f"revoked key {key_id}; running servers refuse it within {DEFAULT_CACHE_TTL:g} s",
                    file=out,
                )
                return 0
            print(f"no active key {key_id}", file=err)
            return 1
        if command == "limits":
            return await run_limits(args, store, out=out, err=err)
        if command == "rotate-encryption":
            return await _rotate(store, Keyring.from_settings(settings), out=out, err=err)
        print(f"unknown keys command {command!r}", file=err)
        return 2
    except GatewayError as exc:
        print(f"error: {exc.message}", file=err)
        return 2
    finally:
        await store.close()


async def _rotate(store: AuthStore, keyring: Keyring, *, out: TextIO, err: TextIO) -> int:
    if not keyring.configured:
        print("error: set LLMGW_ENCRYPTION_KEY to the new passphrase", file=err)
        return 2
    if not keyring.previous:
        print(
            "note: LLMGW_ENCRYPTION_KEY_PREVIOUS is not set; only keys already readable with "
            "LLMGW_ENCRYPTION_KEY are re-encrypted (old-format records are upgraded)",
            file=err,
        )
    report = await rotate_encryption(store, keyring)
    print(
        f"re-encrypted {report.rotated} provider keys, {report.unchanged} already current, "
        f"{report.changed_meanwhile} changed while rotating, {len(report.failed)} failed",
        file=out,
    )
    for organization_id, name, cause in report.failed:
        print(f"cannot decrypt provider {name!r} of organization {organization_id!r}: {cause}", file=err)
    if report.failed:
        return 1
    if keyring.read_v1:
        # Until servers refuse them, an unbound old-format row planted in the table still decrypts.
        print(
            "every BYOK key is now bound to its provider: set LLMGW_BYOK_READ_V1=false on every "
            "server, so an old-format row (one restored from a backup, say) is refused",
            file=out,
        )
    return 0
