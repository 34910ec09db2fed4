"""`llm-gateway keys limits`: read or change the limits of a key or an organization.

    llm-gateway keys limits --key KEY_ID [--rpm N] [--tpm N] [--spend-day USD] [--spend-month USD]
    llm-gateway keys limits --org ORG ...

A flag changes that limit (`off` removes it); the others stay. Without any, prints the limits.
Running servers apply a change within the key cache's lifetime (5 s).
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from server.auth.store import AuthStore, parse_key_id
from server.limits.book import LimitsBook
from server.limits.model import Limits, parse_count, parse_spend, spend_text

_FLAGS = (
    ("rpm", "requests_per_minute", "requests per UTC minute"),
    ("tpm", "tokens_per_minute", "tokens per UTC minute"),
    ("spend_day", "spend_per_day", "US dollars per UTC day, e.g. 25.50"),
    ("spend_month", "spend_per_month", "US dollars per UTC calendar month"),
)


def add_limits_parser(actions: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(
        "limits", help="show or set the limits of a key or an organization ('off' removes one)"
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="a key id (or the key itself)")
    who.add_argument("--org", help="an organization")
    for flag, _, text in _FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest="limit_" + flag, default=None, help=text)
    return parser


def _describe(limits: Limits) -> str:
    parts = []
    for _, name, _ in _FLAGS:
        value = getattr(limits, name)
        if value is not None:
            parts.append(f"{name}={spend_text(value) + ' USD' if name.startswith('spend') else value}")
    return ", ".join(parts) or "no limits"


async def run_limits(args: argparse.Namespace, store: AuthStore, *, out: TextIO, err: TextIO) -> int:
    book = LimitsBook(store, cache_ttl=0.0)
    if args.key:
        key_id = parse_key_id(args.key) or args.key  # a pasted key: its id, never echoed
        if await store.get_key(key_id=key_id) is None:
            print(f"no key {key_id}", file=err)
            return 1
        scope, subject, label = "key", key_id, f"key {key_id}"
    else:
        scope, subject, label = "org", args.org, f"organization {args.org!r}"
    limits = await book.get(scope, subject)  # type: ignore[arg-type]
    changes: dict[str, int | None] = {}
    for flag, name, _ in _FLAGS:
        raw = getattr(args, "limit_" + flag)
        if raw is None:
            continue
        try:
            if raw.strip().lower() == "off":
                changes[name] = None
            elif name.startswith("spend"):
                changes[name] = parse_spend(raw, "--" + flag.replace("_", "-"))
            else:
                changes[name] = parse_count(raw, "--" + flag.replace("_", "-"))
        except ValueError as exc:
            print(f"error: {exc}", file=err)
            return 2
    if changes:
        limits = limits.merged(**changes)
        await book.set(scope, subject, limits)  # type: ignore[arg-type]
        print(f"limits of {label}: {_describe(limits)} (running servers apply them within 5 s)", file=out)
    else:
        print(f"limits of {label}: {_describe(limits)}", file=out)
    return 0
