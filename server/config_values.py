"""Strict readers for the text of boolean and duration settings (server/config.py).

A value that is not one of the documented spellings is an error, never a silent default: an
operator who wrote `LLMGW_BYOK_READ_V1=flase` must not get `false`'s opposite by accident, nor a
grace period of `-5` seconds.
"""

from __future__ import annotations

import math
import re

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# A retention like `30d`: a whole number and one unit.
_RETENTION_RE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_bool(raw: str) -> bool:
    """One of 1/true/yes/on or 0/false/no/off (any case); ValueError otherwise."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{raw!r} is not a boolean (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")


def parse_non_negative(raw: str) -> float:
    """A finite number, 0 or more (seconds, multipliers); ValueError for `-1`, `nan`, `inf`, `10s`."""
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{raw!r} is not a finite number of 0 or more")
    return value


def parse_retention(raw: str) -> float:
    """`30d`, `12h`, `90m`, `3600s`, `2w` -> seconds; empty (or `0`) means keep everything (0.0)."""
    text = raw.strip().lower()
    if text in ("", "0"):
        return 0.0
    match = _RETENTION_RE.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"{raw!r} is not a retention (a positive whole number and a unit: s, m, h, d, w; e.g. 30d)"
        )
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def userinfo_unencoded(url: str) -> bool:
    """True when `url`'s user:password part holds a `/`, `?`, `#` or `@` that is not
    percent-encoded: parsers then cut the URL inside the password, and their error messages
    (and any redaction that trusts the parse) show a piece of it."""
    rest = url.partition("://")[2]
    at = rest.rfind("@")
    return at >= 0 and any(c in rest[:at] for c in "/?#@")


def parse_listen(raw: str, *, allow_unix: bool) -> None:
    """`host:port` (`[v6]:port`, an empty host for every address), port 0..65535; ValueError
    otherwise. `unix:`/`unix-abstract:` addresses pass when `allow_unix` (gRPC serves them)."""
    if allow_unix and raw.startswith(("unix:", "unix-abstract:")):
        return
    host, colon, port = raw.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535 or (":" in host and not host.startswith("[")):
        raise ValueError(f"{raw!r} is not host:port (a port from 0 to 65535; [v6]:port for IPv6)")
