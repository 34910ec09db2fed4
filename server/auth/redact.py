"""Scrubbing secrets from everything the gateway writes: traces, logs, errors, span attributes.

A `Redactor` combines two nets:
  * the exact values it was told about (`add`): server keys, BYOK keys as they are decrypted,
    the encryption passphrase; each also in its URL-encoded and JSON-escaped spellings;
  * patterns for secrets it was not told about: gateway keys (`llmgw_<id>_<secret>`, so every
    gateway key is caught without registering each one), OpenAI-style `sk-...` and Google
    `AIza...` keys, `Authorization`/`api-key` header values, `Bearer` tokens, and URL query
    parameters such as `?key=`, `api_key=`, `token=`.

The common case (no secret present) costs one substring search per known secret plus a
lower-casing of the text and a few substring searches; a regex only runs when its trigger
substring is present. Values shorter than `MIN_SECRET_LENGTH` are not registered: redacting every
occurrence of a 3-character "key" would shred the traces and protects nothing real.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from server.config import Settings

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
        "openai-api-key",
        "x-llmgw-key",
    }
)
# JSON keys compared after lower-casing and mapping "-" to "_".
SENSITIVE_JSON_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "api_secret",
        "authorization",
        "proxy_authorization",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "secret_key",
        "secret",
        "password",
        "token",
        "bearer",
        "x_goog_api_key",
        "openai_api_key",
        "openrouter_api_key",
        "private_key",
        "encryption_key",
    }
)

# URL query parameters whose value is a credential.
_QUERY_NAMES = frozenset(
    {
        "key",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "token",
        "access_token",
        "access-token",
        "auth",
        "secret",
        "client_secret",
        "client-secret",
        "password",
        "sig",
        "signature",
    }
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


_API_KEY_NAMES = ("api-key", "api_key", "apikey")


@dataclass(frozen=True, slots=True)
class _Rule:
    """Redact group `secret` of `tail` matched right after each occurrence of a keyword.

    Finding keywords with `str.find` and matching a regex only there is far cheaper than running
    a case-insensitive alternation over the whole text (which costs ~20 ns per character); few,
    short keywords and a one-character `prefilter` (memchr speed) keep the common case cheap.
    """

    keywords: tuple[str, ...]
    tail: re.Pattern[str]
    ignore_case: bool = False  # keywords are lower case, searched in the lower-cased text
    keyword_is_secret: bool = False  # the keyword starts the secret (known key formats)
    word_boundary: bool = True  # the character before the name must not be a letter or digit
    prefilter: str = ""  # a character the text must contain for the rule to apply
    # The keyword ends a name ([a-z0-9_-]*keyword); the whole name must be in `names` (exact) or
    # end with one of `name_suffixes`, and, with `query`, follow `?`, `&` or `;` (or start the text).
    names: frozenset[str] = frozenset()
    name_suffixes: tuple[str, ...] = ()
    query: bool = False


_RULES: tuple[_Rule, ...] = (
    _Rule(
        ("llmgw_",), re.compile(r"[0-9a-f]{16}_[A-Za-z0-9_-]+"), keyword_is_secret=True, word_boundary=False
    ),
    _Rule(("sk-",), re.compile(r"[A-Za-z0-9_-]{20,}"), keyword_is_secret=True),
    _Rule(("AIza",), re.compile(r"[0-9A-Za-z_-]{30,}"), keyword_is_secret=True),
    _Rule(
        ("key=", "token=", "auth=", "secret=", "password=", "sig=", "signature="),
        re.compile(r"(?P<secret>[^&#\s\"'<>]+)"),
        ignore_case=True,
        word_boundary=False,
        prefilter="=",
        names=_QUERY_NAMES,
        query=True,
    ),
    _Rule(
        ("authorization", "key"),
        re.compile(
            r"['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|basic|token)\s+)?(?P<secret>[^\s'\",;{}\[\]()]+)",
            re.IGNORECASE,
        ),
        ignore_case=True,
        name_suffixes=("authorization", *_API_KEY_NAMES),
    ),
    _Rule(
        ("bearer",),
        re.compile(r"\s+(?P<secret>(?!\[REDACTED\])[A-Za-z0-9._~+/=-]{8,})"),
        ignore_case=True,
    ),
)


def _name_ok(rule: _Rule, text: str, haystack: str, start: int, after: int) -> bool:
    if not (rule.names or rule.name_suffixes):
        return not (rule.word_boundary and start > 0 and text[start - 1] in _WORD_CHARS)
    name_start = start
    while name_start > 0 and haystack[name_start - 1] in _NAME_CHARS:
        name_start -= 1
    name = haystack[name_start:after].rstrip("=")
    if rule.names and name not in rule.names:
        return False
    if rule.name_suffixes and not name.endswith(rule.name_suffixes):
        return False
    if rule.query:
        return name_start == 0 or text[name_start - 1] in "?&;"
    return not (rule.word_boundary and name_start > 0 and text[name_start - 1] in _WORD_CHARS)


def _apply(rule: _Rule, text: str, haystack: str) -> str:
    if rule.prefilter and rule.prefilter not in text:
        return text
    spans: list[tuple[int, int]] = []
    for keyword in rule.keywords:
        start = haystack.find(keyword)
        while start >= 0:
            after = start + len(keyword)
            # The anchored match is cheap C; the name check is Python, so it goes second.
            match = rule.tail.match(text, after)
            if match is not None and _name_ok(rule, text, haystack, start, after):
                spans.append((start, match.end()) if rule.keyword_is_secret else match.span("secret"))
            start = haystack.find(keyword, after)
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    last = 0
    for begin, end in spans:
        if begin < last:  # overlapping: already covered
            last = max(last, end)
            continue
        pieces.append(text[last:begin])
        pieces.append(REDACTED)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def _spellings(secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote(secret, safe="/"), json.dumps(secret)[1:-1]}
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


class Redactor:
    """Knows the secrets in play and scrubs them (and secret-looking values) from text and JSON."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self._known: set[str] = set()
        self.add_many(secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """A redactor that knows every server-held secret of the settings."""
        return cls(
            (
                settings.openai_api_key,
                settings.openrouter_api_key,
                settings.local_api_key,
                settings.encryption_key,
            )
        )

    def add(self, *secrets: str) -> None:
        """Register secret values (empty ones are skipped; idempotent; cheap when already known)."""
        self.add_many(secrets)

    def add_many(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH and s not in self._known}
        if not new:
            return
        self._known |= new
        forms = set(self._secrets)
        for secret in new:
            forms |= _spellings(secret)
        # Longest first, so a secret containing another is replaced whole. Swapped atomically.
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def __contains__(self, secret: str) -> bool:
        return secret in self._known

    def __len__(self) -> int:
        return len(self._known)

    def redact(self, text: str) -> str:
        """`text` with every known secret and secret-looking value replaced by `[REDACTED]`."""
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lowered: str | None = None
        for rule in _RULES:
            if rule.ignore_case:
                if lowered is None:
                    lowered = text.lower()
                    if len(lowered) != len(text):  # rare non-ASCII case changes length: stay aligned
                        lowered = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)
                haystack = lowered
            else:
                haystack = text
            new_text = _apply(rule, text, haystack)
            if new_text is not text:
                text = new_text
                lowered = None
        return text

    scrub = redact  # the name the request path uses: `Callable[[str], str]`

    def redact_exception(self, exc: BaseException) -> str:
        """`Type: message` of an exception, redacted (for error texts and trace error_message)."""
        return self.redact(f"{type(exc).__name__}: {exc}")

    def redact_headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
        """A copy with credential headers replaced and every other value redacted as text."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        out: dict[str, str] = {}
        for name, value in items:
            out[name] = REDACTED if name.lower() in SENSITIVE_HEADERS else self.redact(value)
        return out

    def redact_json(self, obj: object) -> object:
        """A copy of a JSON value with secret-named scalar fields replaced and all strings redacted."""
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            out: dict[object, object] = {}
            for key, value in obj.items():
                sensitive = isinstance(key, str) and key.lower().replace("-", "_") in SENSITIVE_JSON_KEYS
                if (
                    sensitive
                    and isinstance(value, str | int | float)
                    and not isinstance(value, bool)
                    and value != ""
                ):
                    out[key] = REDACTED
                else:
                    out[key] = self.redact_json(value)
            return out
        if isinstance(obj, list | tuple):
            return [self.redact_json(item) for item in obj]
        return obj


def _redact_record(record: logging.LogRecord, redactor: Redactor) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string must not lose the record
        message = str(record.msg)
    record.msg = redactor.redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redactor.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message, the exception text and stack info.

    Attach it to handlers (`handler.addFilter(RedactingFilter(redactor))`), so records from every
    logger, third-party ones included, pass through it.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record, self.redactor)
        return True


_installed: list[Redactor] = []  # the redactor of the installed record factory (at most one)
_original_factory: Callable[..., logging.LogRecord] | None = None


def install_log_redaction(redactor: Redactor) -> None:
    """Redact every log record of the process, whatever its logger or handler, present or future.

    Wraps the log record factory, so the message (with its arguments), the exception text and
    the stack are redacted when the record is made; records below a logger's level are never
    made, so disabled debug logging costs nothing. Installing again replaces the redactor.
    """
    global _original_factory
    if _installed:
        _installed[0] = redactor
        return
    original = logging.getLogRecordFactory()
    _original_factory = original
    _installed.append(redactor)

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = original(*args, **kwargs)
        if _installed:
            _redact_record(record, _installed[0])
        return record

    logging.setLogRecordFactory(factory)


def uninstall_log_redaction() -> None:
    """Undo `install_log_redaction` (tests)."""
    global _original_factory
    if _original_factory is not None:
        logging.setLogRecordFactory(_original_factory)
        _original_factory = None
    _installed.clear()
