"""Issue 12 item 1: an upstream's text passed on in an error is bounded, and scrubbed *before*
it is cut, so a key straddling the cut leaves no prefix behind."""

from __future__ import annotations

import orjson
import pytest

from server.errors import GatewayError
from server.providers.errors import MAX_MESSAGE_CHARS, error_for_status, scrubbed_prefix
from server.providers.openai_compat import parse_json_object

KEY = "sk-proj-" + "Q7x" * 15  # 53 characters


def scrub(text: str) -> str:
    return text.replace(KEY, "[REDACTED]")


def leaked(text: str) -> bool:
    return KEY[:10] in text


@pytest.mark.parametrize("offset", range(0, 1200, 13))
def test_an_error_body_cut_mid_key_leaks_no_prefix(offset: int) -> None:
    for body in (("x" * offset + KEY + " ") * 500, "x" * offset + KEY):
        for payload in (body.encode(), orjson.dumps({"error": {"message": body}})):
            error = error_for_status(400, payload, {}, provider="p", scrub=scrub)
            assert isinstance(error, GatewayError)
            assert len(error.message) <= MAX_MESSAGE_CHARS + 100
            assert not leaked(error.message), offset


@pytest.mark.parametrize("offset", range(150, 210, 3))
def test_a_non_json_answer_cut_mid_key_leaks_no_prefix(offset: int) -> None:
    with pytest.raises(GatewayError) as raised:
        parse_json_object(("<" * offset + KEY).encode(), provider="p", scrub=scrub)
    assert not leaked(raised.value.message)
    assert len(raised.value.message) < 400


def test_scrubbed_prefix_is_bounded_and_scrubbed() -> None:
    text = "a" * 5 + KEY * 100_000  # 5 MB of keys: the window grows until the cut is safe
    assert scrubbed_prefix(text, scrub, 100) == ("a" * 5 + "[REDACTED]" * 10)[:100]
    assert scrubbed_prefix("short", scrub, 100) == "short"
