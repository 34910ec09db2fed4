"""Secret redaction (server.auth.redact)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from server.auth.redact import (
    REDACTED,
    Redactor,
    install_log_redaction,
    uninstall_log_redaction,
)
from server.config import Settings

SERVER_KEY = "sk-proj-SERVERkey0123456789abcdefABCDEF"
BYOK_KEY = "byok/key+with=odd&chars1234"
GATEWAY_KEY = "llmgw_0123456789abcdef_Q1w2E3r4T5y6U7i8O9p0A1s2D3f4G5h6J7k8L9z0X1c"


@pytest.fixture
def redactor() -> Redactor:
    r = Redactor([SERVER_KEY])
    r.add(BYOK_KEY, "", "short")
    return r


def test_known_secrets_and_their_spellings(redactor: Redactor) -> None:
    assert redactor.redact(f"boom: {SERVER_KEY} failed") == f"boom: {REDACTED} failed"
    assert BYOK_KEY in redactor and "short" not in redactor and len(redactor) == 2
    assert redactor.redact(f"x {BYOK_KEY} y") == f"x {REDACTED} y"
    encoded = "byok%2Fkey%2Bwith%3Dodd%26chars1234"
    assert redactor.redact(f"https://h/p?q={encoded}") == f"https://h/p?q={REDACTED}"
    assert BYOK_KEY not in redactor.redact(json.dumps({"detail": f"key {BYOK_KEY}"}))


def test_gateway_keys_by_pattern() -> None:
    r = Redactor()
    assert r.redact(f"Bearer-less {GATEWAY_KEY}!") == f"Bearer-less {REDACTED}!"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET https://api.example.com/v1/models?key=abc123secret", "abc123secret"),
        ("https://x.com/a?foo=1&api_key=abc123secret&bar=2", "abc123secret"),
        ("https://x.com/a?API-KEY=abc123secret#frag", "abc123secret"),
        ("https://x.com/a?token=abc123secret", "abc123secret"),
        ("https://x.com/a?access_token=abc123secret", "abc123secret"),
        ("Authorization: Bearer abc123secret", "abc123secret"),
        ("authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("{'Authorization': 'Bearer abc123secret'}", "abc123secret"),
        ('{"authorization": "Bearer abc123secret"}', "abc123secret"),
        ("x-api-key: abc123secret", "abc123secret"),
        ('{"api_key": "abc123secret"}', "abc123secret"),
        ("api-key=abc123secret", "abc123secret"),
        ("sent bearer abc123secret.xyz upstream", "abc123secret"),
        (
            "OpenAI error: Incorrect API key provided: sk-abcdefghij0123456789XYZ.",
            "sk-abcdefghij0123456789XYZ",
        ),
        ("sk-or-v1-0123456789abcdef0123456789abcdef", "sk-or-v1-0123456789abcdef"),
        ("AIzaSyA0123456789abcdefghijklmnopqrstuv", "AIzaSyA0123456789abcdefghijklmnopqrstuv"),
    ],
)
def test_patterns(text: str, secret: str) -> None:
    out = Redactor().redact(text)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        '{"model": "gpt-4o", "max_tokens": 10, "tools": [{"type": "function"}]}',
        "a task-force of 30 people; x = y + 1",
        '{"properties": {"api_key": {"type": "string"}}}',
        "https://api.openai.com/v1/chat/completions?stream=true",
    ],
)
def test_innocent_text_is_untouched(text: str) -> None:
    assert Redactor([SERVER_KEY]).redact(text) == text


def test_redact_json(redactor: Redactor) -> None:
    obj = {
        "api_key": "plain",
        "Api-Key": "plain2",
        "headers": {"Authorization": "Bearer t", "x-api-key": "k"},
        "nested": [{"token": "t"}, {"password": 123}],
        "message": f"failed with {SERVER_KEY}",
        "max_tokens": 100,
        "stream": True,
        "empty": {"api_key": ""},
        "schema": {"properties": {"token": {"type": "string"}}, "required": ["token"]},
    }
    out = redactor.redact_json(obj)
    assert out == {
        "api_key": REDACTED,
        "Api-Key": REDACTED,
        "headers": {"Authorization": REDACTED, "x-api-key": REDACTED},
        "nested": [{"token": REDACTED}, {"password": REDACTED}],
        "message": f"failed with {REDACTED}",
        "max_tokens": 100,
        "stream": True,
        "empty": {"api_key": ""},
        "schema": {"properties": {"token": {"type": "string"}}, "required": ["token"]},
    }
    assert obj["api_key"] == "plain"


def test_scrub_is_redact(redactor: Redactor) -> None:
    assert redactor.scrub(f"x{SERVER_KEY}") == f"x{REDACTED}"


def test_longest_secret_wins() -> None:
    r = Redactor(["abcdefgh", "abcdefgh-ijklmnop"])
    assert r.redact("abcdefgh-ijklmnop") == REDACTED


def test_fast_when_nothing_to_redact() -> None:
    r = Redactor([f"secret-value-number-{i:04d}-xyz" for i in range(50)])
    text = json.dumps({"messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 400}]})
    start = time.perf_counter()
    for _ in range(200):
        assert r.redact(text) == text
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 0.002, per_call  # ~11 KB, 50 secrets: well under the budget of a request


def _capture(logger: logging.Logger) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return stream, handler


@pytest.fixture
def installed(redactor: Redactor) -> Iterator[Redactor]:
    install_log_redaction(redactor)
    try:
        yield redactor
    finally:
        uninstall_log_redaction()


def test_install_log_redaction(installed: Redactor) -> None:
    logger = logging.getLogger("test_auth_redact.installed")
    stream, handler = _capture(logger)
    try:
        logger.info("key=%s and %s", SERVER_KEY, GATEWAY_KEY)
        installed.add("late-secret-value")
        logger.warning("now %s", "late-secret-value")
        try:
            raise KeyError(BYOK_KEY)
        except KeyError:
            logger.error("oops", exc_info=True)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for secret in (SERVER_KEY, GATEWAY_KEY, BYOK_KEY, "late-secret-value"):
        assert secret not in out
    assert out.count(REDACTED) >= 4


def test_from_settings() -> None:
    settings = Settings(openai_api_key="sk-openai-0123456789", encryption_key="passphrase-xyz")
    r = Redactor.from_settings(settings)
    assert r.redact("sk-openai-0123456789 passphrase-xyz") == f"{REDACTED} {REDACTED}"


def _every_rule(redactor: Redactor, text: str) -> str:
    """`redact` as it was before its keyword pre-check: every rule applied to every text."""
    from server.auth import redact

    text = redactor.redact_known(text)
    for rule in redact._RULES:
        haystack = text.lower() if rule.ignore_case else text
        if len(haystack) != len(text):
            haystack = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)
        text = redact._apply(rule, text, haystack)
    return text


@pytest.mark.parametrize(
    "text",
    [
        "https://x.com/a?API-KEY=abc123secret#frag",
        "https://x.com/a?Token=abc123secret&SIG=abcdef0123456&Signature=zz",
        "AUTHORIZATION: BEARER abc123secret",
        "X-Api-Key: abc123secret and later authorization=abc123secret",
        "KEY: abc123secret, bearer abc123secret.xyz",
        "sent BeArEr abc123secret.xyz upstream",
        "Sk-abcdefghij0123456789XYZ (not a key: capital S) sk-abcdefghij0123456789XYZ",
        "aiza0123456789abcdefghijklmnopqrstuv AIzaSyA0123456789abcdefghijklmnopqrstuv",
        f"İstanbul KEY: abc123secret {GATEWAY_KEY} {SERVER_KEY}",  # İ lowers to 2 characters
        "no keyword at all, only = signs = here",
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"keep it short"}]}',
    ],
)
def test_keyword_precheck_changes_nothing(redactor: Redactor, text: str) -> None:
    # A rule is skipped when none of its keywords is in the (lower-cased) text: the result is
    # the one applying every rule gives, in every case spelling.
    assert redactor.redact(text) == _every_rule(redactor, text)
    assert redactor.redact(text.upper()) == _every_rule(redactor, text.upper())


def test_the_rules_redact_tests_in_order() -> None:
    """Redactor.redact writes out each rule's keyword test: these are the rules it was written for
    (a rule added, reordered or changed makes this fail until redact is changed with it)."""
    from server.auth import redact

    assert [(r.keywords, r.ignore_case, r.prefilter) for r in redact._RULES] == [
        (("llmgw_",), False, ""),
        (("sk-",), False, ""),
        (("AIza",), False, ""),
        (("key=", "token=", "auth=", "secret=", "password=", "sig=", "signature="), True, "="),
        (("authorization", "key"), True, ""),
        (("bearer",), True, ""),
    ]


# Pieces every rule reacts to (and near misses), in several case spellings; hypothesis joins them.
_PIECES = [
    "llmgw_0123456789abcdef_Q1w2E3r4",
    "llmgw_",
    "sk-",
    "sk-abcdefghij0123456789XYZ",
    "Sk-abcdefghij0123456789XYZ",
    "AIza0123456789abcdefghijklmnopqrstuv",
    "aiza0123456789abcdefghijklmnopqrstuv",
    "?key=abc123secret",
    "&Token=abc123secret",
    ";SIG=abcdef0123456",
    "api_key=",
    "password=hunter2secret",
    "=",
    "Authorization: Bearer abc123secret.xyz",
    "X-Api-Key: abc123secret",
    '"api_key": "abc123secret"',
    "KEY",
    "key",
    "bearer abc123secret",
    "BEARER [REDACTED]",
    "İ",
    "ß",
    " ",
    "\n",
    '"',
    "plain text",
    SERVER_KEY,
    BYOK_KEY,
]


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=8))
def test_redact_equals_every_rule_applied(pieces: list[str]) -> None:
    redactor = Redactor([SERVER_KEY])
    redactor.add(BYOK_KEY)
    for text in ("".join(pieces), " ".join(pieces)):
        assert redactor.redact(text) == _every_rule(redactor, text)
        assert redactor.redact(text.upper()) == _every_rule(redactor, text.upper())
