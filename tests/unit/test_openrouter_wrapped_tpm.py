"""OpenRouter wraps a provider's error as `{"error": {"message": "Provider returned error", "code":
429, "metadata": {"raw": "<the provider's text>", "provider_name": "..."}}}`. When the provider's
text says this request alone is over its tokens-per-minute limit, it maps as the same text
unwrapped does (RATE_LIMIT_EXCEEDED, not retried, no RetryInfo, the counts in metadata)."""

from __future__ import annotations

import json

import orjson
import pytest

from server.core.retry import RetryableError
from server.errors import RateLimitExceeded, UpstreamRejected
from server.providers import errors
from server.providers.errors import RAW_SCAN_CHARS, error_for_status

GROQ_TEXT = (
    "Request too large for model `llama-3.3-70b-versatile` in organization `org_01kgg5588eftc8k70a` "
    "service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 12328, please reduce "
    "your message size and try again."
)
OPENAI_TEXT = (
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Requested 342389. The input or output tokens must be reduced in order to run successfully."
)
WAIT_TEXT = (
    "Rate limit reached for model `llama-3.1-8b-instant` in organization `org_01j5b4pz` service tier "
    "`on_demand` on tokens per minute (TPM): Limit 6000, Used 5034, Requested 1443. Please try again "
    "in 4.77s."
)
SECRET = "gsk_" + "S" * 40


def scrub(text: str) -> str:
    return text.replace(SECRET, "[redacted]")


def wrapped(raw: object, provider_name: object = "Groq", code: object = 429) -> bytes:
    meta: dict[str, object] = {"raw": raw}
    if provider_name is not None:
        meta["provider_name"] = provider_name
    return orjson.dumps({"error": {"message": "Provider returned error", "code": code, "metadata": meta}})


def groq_json(text: str) -> str:
    return json.dumps({"error": {"message": text, "type": "tokens", "code": "rate_limit_exceeded"}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GROQ_TEXT, GROQ_TEXT),  # the provider's text as it is
        (groq_json(GROQ_TEXT), GROQ_TEXT),  # a JSON string of the provider's error object
        ("  " + groq_json(OPENAI_TEXT), OPENAI_TEXT),
        ({"error": {"message": GROQ_TEXT}}, GROQ_TEXT),  # an object, not a string
        ('{"error": "not an object"}', '{"error": "not an object"}'),  # no error.message: the text
        ("{not json", "{not json"),
        (7, ""),
        (None, ""),
    ],
)
def test_wrapped_raw_reads_the_providers_text(raw: object, expected: str) -> None:
    assert errors._wrapped_raw(wrapped(raw)) == (expected, "Groq")  # noqa: SLF001


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"raw": "x"}',
        orjson.dumps({"error": {"message": "m", "metadata": "raw"}}),
        orjson.dumps({"error": None, "raw": GROQ_TEXT}),
        orjson.dumps({"error": {"message": GROQ_TEXT}}),  # no "raw" at all: no parse
    ],
)
def test_bodies_without_a_wrapped_error_have_no_raw(body: bytes) -> None:
    assert errors._wrapped_raw(body) == ("", "")  # noqa: SLF001


def test_at_most_raw_scan_chars_of_raw_are_read() -> None:
    long = GROQ_TEXT + " " * (3 * RAW_SCAN_CHARS)
    raw, _ = errors._wrapped_raw(wrapped(long))  # noqa: SLF001
    assert raw == long[:RAW_SCAN_CHARS]
    # A JSON object longer than that is cut, so read as text: the words are still there.
    long_json = groq_json(GROQ_TEXT + " " * (2 * RAW_SCAN_CHARS))
    raw, _ = errors._wrapped_raw(wrapped(long_json))  # noqa: SLF001
    assert raw == long_json[:RAW_SCAN_CHARS]
    assert isinstance(
        error_for_status(429, wrapped(long_json), {}, provider="openrouter", scrub=str), RateLimitExceeded
    )
    # The words after the first RAW_SCAN_CHARS characters are not read.
    late = " " * RAW_SCAN_CHARS + GROQ_TEXT
    assert isinstance(
        error_for_status(429, wrapped(late), {}, provider="openrouter", scrub=str), RetryableError
    )


@pytest.mark.parametrize(
    ("raw", "counts"),
    [
        (GROQ_TEXT, ("6000", "12328")),
        (groq_json(GROQ_TEXT), ("6000", "12328")),
        (groq_json(OPENAI_TEXT), ("30000", "342389")),
    ],
)
@pytest.mark.parametrize("status", [429, 413])
def test_a_wrapped_over_the_minute_text_maps_as_the_unwrapped_one(
    raw: str, counts: tuple[str, str], status: int
) -> None:
    error = error_for_status(status, wrapped(raw), {"retry-after": "3"}, provider="openrouter", scrub=scrub)
    assert isinstance(error, RateLimitExceeded)  # not a RetryableError: waiting never helps
    assert error.retry_delay is None
    assert (error.metadata["limit_tokens_per_minute"], error.metadata["requested_tokens"]) == counts
    assert error.metadata["upstream_provider"] == "Groq"
    assert "Provider returned error (Groq: Request too large for " in error.message
    assert f"Limit {counts[0]}, Requested {counts[1]})" in error.message
    assert "not retried" in error.message


def test_in_a_200_body_or_stream_event_it_maps_the_same() -> None:
    payload = orjson.loads(wrapped(groq_json(GROQ_TEXT)))
    error = errors.error_in_body(payload, provider="openrouter", scrub=scrub)
    assert isinstance(error, RateLimitExceeded) and error.final
    assert error.metadata["http_status"] == "200" and error.metadata["upstream_code"] == "429"
    assert error.metadata["requested_tokens"] == "12328"


@pytest.mark.parametrize("raw", [WAIT_TEXT, groq_json(WAIT_TEXT), "Upstream busy", ""])
def test_other_wrapped_429s_stay_retryable(raw: str) -> None:
    mapped = error_for_status(429, wrapped(raw), {}, provider="openrouter", scrub=scrub)
    assert isinstance(mapped, RetryableError)
    assert "limit_tokens_per_minute" not in mapped.error.metadata


def test_other_statuses_do_not_read_the_raw() -> None:
    mapped = error_for_status(400, wrapped(GROQ_TEXT), {}, provider="openrouter", scrub=scrub)
    assert isinstance(mapped, UpstreamRejected)
    assert "limit_tokens_per_minute" not in mapped.metadata


def test_the_wrapped_text_and_the_provider_name_are_scrubbed() -> None:
    # A key the provider echoed, inside the words that reach the message, and as the name.
    text = GROQ_TEXT.replace("`org_01kgg5588eftc8k70a`", SECRET)
    error = error_for_status(
        429, wrapped(groq_json(text), provider_name=SECRET), {}, provider="openrouter", scrub=scrub
    )
    assert isinstance(error, RateLimitExceeded)
    assert SECRET not in error.message and SECRET not in str(error.metadata)
    assert "[redacted]" in error.message and error.metadata["upstream_provider"] == "[redacted]"


def test_a_provider_name_that_is_no_text_is_left_out() -> None:
    error = error_for_status(
        429, wrapped(GROQ_TEXT, provider_name={"x": 1}), {}, provider="openrouter", scrub=str
    )
    assert isinstance(error, RateLimitExceeded)
    assert "upstream_provider" not in error.metadata
    assert "(the provider: Request too large for " in error.message
