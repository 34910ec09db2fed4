"""The HTTP client's header block: the usable names it has seen are remembered (never a value:
values carry the keys); the block is the same as checking every name anew."""

from __future__ import annotations

import pytest

from server.providers import http
from server.providers.http import InvalidHeaderError, _header_block

DEFAULTS = {"user-agent": ("User-Agent", "llm-gateway"), "accept-encoding": ("Accept-Encoding", "identity")}


def test_the_block_renders_each_calls_values_with_the_names_cached() -> None:
    http._USABLE_NAMES.clear()
    for key in ("sk-first-key-0123456789", "sk-second-key-9876543210"):
        block = _header_block(
            DEFAULTS, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}, 12
        )
        assert (
            block
            == (
                "Content-Length: 12\r\nUser-Agent: llm-gateway\r\nAccept-Encoding: identity\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n\r\n"
            ).encode()
        )
    assert http._USABLE_NAMES == {"Content-Type": "content-type", "Authorization": "authorization"}
    assert not any("sk-" in value for value in http._USABLE_NAMES.values())
    # An override keeps the default's place, case-insensitively, with the caller's spelling.
    assert _header_block(DEFAULTS, {"user-AGENT": "me"}, 0) == (
        b"Content-Length: 0\r\nuser-AGENT: me\r\nAccept-Encoding: identity\r\n\r\n"
    )


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Bad Name", "", "x\r\ny"])
def test_unusable_names_are_refused_every_time(name: str) -> None:
    http._USABLE_NAMES.clear()
    _header_block(DEFAULTS, {"X-Fine": "1"}, 0)
    for _ in range(2):
        with pytest.raises(InvalidHeaderError):
            _header_block(DEFAULTS, {"X-Fine": "1", name: "v"}, 0)
    assert name not in http._USABLE_NAMES


def test_a_bad_value_is_refused_under_a_cached_name() -> None:
    _header_block(DEFAULTS, {"Authorization": "Bearer ok"}, 0)
    with pytest.raises(InvalidHeaderError):
        _header_block(DEFAULTS, {"Authorization": "Bearer a\r\nInjected: 1"}, 0)


def test_the_name_cache_is_bounded_in_entries_and_in_name_length() -> None:
    http._USABLE_NAMES.clear()
    for n in range(http._MAX_CACHED_NAMES + 20):
        assert (
            _header_block({}, {f"X-Name-{n}": "v"}, 0)
            == f"Content-Length: 0\r\nX-Name-{n}: v\r\n\r\n".encode()
        )
        assert len(http._USABLE_NAMES) <= http._MAX_CACHED_NAMES
    http._USABLE_NAMES.clear()
    long = "X-" + "a" * http._MAX_CACHED_NAME_CHARS
    assert _header_block({}, {long: "v"}, 0) == f"Content-Length: 0\r\n{long}: v\r\n\r\n".encode()
    assert http._USABLE_NAMES == {}
