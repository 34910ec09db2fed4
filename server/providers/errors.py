"""Translate what an upstream answered (status, body, transport failure) into gateway errors."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping

import orjson

from server.core.retry import RetryableError, parse_retry_after
from server.errors import (
    ContextWindowExceeded,
    GatewayError,
    ModelNotFound,
    NotFound,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.providers import context_overflow
from server.providers.http_connection import InvalidResponseError

MAX_MESSAGE_CHARS = 1000
# Longer than any secret the gateway holds: how far past a cut an unscrubbed key prefix can reach.
_SECRET_MARGIN = 4096
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def scrubbed_prefix(text: str | bytes, scrub: Callable[[str], str], limit: int) -> str:
    """At most `limit` characters of `text` (bytes: decoded as UTF-8), scrubbed *before* the cut.

    Cutting first would leave the prefix of a key that straddles the cut, which no scrubber
    recognizes. The scrubbed window grows until the place where it was cut lies at least
    `_SECRET_MARGIN` characters past `limit` (scrubbing shrinks text), so whatever is left of a
    partial key at the window's end is cut off too.
    """
    return scrubbed_prefix_cut(text, scrub, limit)[0]


def scrubbed_prefix_cut(text: str | bytes, scrub: Callable[[str], str], limit: int) -> tuple[str, bool]:
    """`scrubbed_prefix`, and whether anything of the scrubbed text was cut off (not the same as
    the scrubbed text being shorter than the original: a scrubbed key shrinks it)."""
    window = limit * 4 + _SECRET_MARGIN
    while True:
        piece = text[:window]
        scrubbed = scrub(piece if isinstance(piece, str) else piece.decode("utf-8", "replace"))
        if len(text) <= window or len(scrubbed) >= limit + _SECRET_MARGIN:
            return scrubbed[:limit], len(scrubbed) > limit
        window *= 4


def upstream_message(body: bytes, scrub: Callable[[str], str] = str) -> str:
    """The provider's own error message (scrubbed), from the usual JSON shapes or the raw text."""
    text = ""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        # The first of these that says something: `"error": null` (or a flag, `"error": true`,
        # a number, "" or {}) next to a "detail" or "message" is no error text (it used to stop
        # the look-up: the message became "True", "{}" or the whole body).
        err = next((v for k in ("error", "detail", "message") if _says(v := payload.get(k))), None)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("msg") or err)
        elif err is not None:
            text = str(err)
    if not text:
        start = body[:64].lstrip().lower()
        if start.startswith((b"<!doctype", b"<html", b"<head", b"<body")):
            title = _TITLE.search(body[:65536])
            name = " ".join(html.unescape(title.group(1).decode("utf-8", "replace")).split()) if title else ""
            text = f"HTML error page: {name}" if name else "HTML error page"
        else:
            return scrubbed_prefix(body.strip(), scrub, MAX_MESSAGE_CHARS)
    return scrubbed_prefix(text, scrub, MAX_MESSAGE_CHARS)


def _says(value: object) -> bool:
    """Whether a field of an error body carries a message: text, or a non-empty object or list."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, dict | list) and bool(value)


def error_for_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    provider: str,
    scrub: Callable[[str], str],
    in_body: bool = False,
) -> RetryableError | GatewayError:
    """The error for a non-2xx answer; RetryableError when a retry may help.

    `in_body`: the status is the code of an `error` object a 200 carried; it is classified (and
    retried) as that status, but the message and metadata say what was actually answered.
    """
    message = upstream_message(body, scrub)
    meta: dict[str, object] = {"http_status": status, "provider": provider}
    text = f"{provider} answered HTTP {status}"
    if in_body:
        meta = {"http_status": 200, "upstream_code": status, "provider": provider}
        text = f"{provider} answered HTTP 200 with an error object (code {status})"
    if message:
        text += f": {message}"
    too_large = _over_the_minute_limit(message) if status in (413, 429) else None
    if too_large is None and status in (413, 429):
        # OpenRouter's "Provider returned error": the provider's own text in error.metadata.raw.
        raw, name = _wrapped_raw(body)
        said = scrub(raw) if raw else ""  # scanned scrubbed, as `message` is
        too_large = _over_the_minute_limit(said)
        if too_large is not None:
            name = scrubbed_prefix(name, scrub, 100)
            if name:
                meta["upstream_provider"] = name
            text += f" ({name or 'the provider'}: {_over_the_minute_span(said)})"
    if too_large is not None:
        # Groq's 413 (and OpenAI's 429) "Request too large for model ... on tokens per minute
        # (TPM): Limit 6000, Requested 12328": this request alone needs more than the per-minute
        # limit allows, so waiting never helps (not retried, no RetryInfo); a deployment with a
        # higher limit may take it (routing falls back without cooling this one down).
        code = _error_code(body)
        if isinstance(code, str) and code:
            meta.setdefault("upstream_code", scrub(code)[:64])
        meta["limit_tokens_per_minute"], meta["requested_tokens"] = too_large
        return RateLimitExceeded(
            f"{text} (this request alone is over the per-minute token limit: not retried)", metadata=meta
        )
    if status == 429:
        if _is_quota_exhausted(body):
            # OpenAI's "You exceeded your current quota" (billing): waiting never clears it, so
            # it is not retried and carries no RetryInfo.
            meta["upstream_code"] = INSUFFICIENT_QUOTA
            return RateLimitExceeded(f"{text} (the account's quota is used up: not retried)", metadata=meta)
        retry_after = parse_retry_after(headers)
        return RetryableError(
            RateLimitExceeded(
                text, metadata=meta, retry_delay=retry_after if retry_after is not None else 1.0
            ),
            status=status,
            retry_after=retry_after,
        )
    if status in (401, 403):
        return UpstreamAuthFailed(text, metadata=meta)
    if status == 404:
        return not_found_error(body, text, meta, provider=provider)
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(headers)
        return RetryableError(
            UpstreamUnavailable(text, metadata=meta, retry_delay=retry_after),
            status=status,
            retry_after=retry_after,
        )
    if 400 <= status < 500:
        # The provider's tokenizer counted more than the window (the gateway's tiktoken guard
        # passed): agents summarize on CONTEXT_WINDOW_EXCEEDED, they give up on UPSTREAM_REJECTED.
        # The servers whose message carries the counts first (they go into the metadata).
        overflow = context_overflow.overflow_error(status, body, text, meta)
        if overflow is not None:
            return overflow
        if status == 400 and _context_length_exceeded(body, message):
            return ContextWindowExceeded(text, metadata=meta)
        return UpstreamRejected(text, metadata=meta)
    return UpstreamBadResponse(text, metadata=meta)


# An error body kept for the trace: enough for any server's error object, bounded.
TRACE_BODY_CHARS = 16384


def keep_error_body(
    error: RetryableError | GatewayError, status: int, body: bytes, scrub: Callable[[str], str]
) -> RetryableError | GatewayError:
    """`error` with the answer's body (scrubbed before it is cut, at most TRACE_BODY_CHARS) as
    its `trace_body`: a trace of a refused call shows what the upstream said, not nothing."""
    inner = error.error if isinstance(error, RetryableError) else error
    text, cut = scrubbed_prefix_cut(body, scrub, TRACE_BODY_CHARS)
    inner.trace_body = orjson.dumps({"http_status": status, "body": text, "truncated": cut}).decode()
    return error


# OpenAI's and Groq's `code`; DeepSeek, vLLM and OpenRouter say it only in words ("This model's
# maximum context length is 65536 tokens. However, you requested ...").
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
_MAX_CONTEXT = re.compile(r"maximum context length is \d+", re.IGNORECASE)


def _context_length_exceeded(body: bytes, message: str) -> bool:
    if CONTEXT_LENGTH_EXCEEDED.encode() in body[:65536] and _error_code(body) == CONTEXT_LENGTH_EXCEEDED:
        return True
    return bool(_MAX_CONTEXT.search(message))


# What a server answers for a path it does not serve (the usual cause: a base URL without /v1):
# Go's mux (Ollama) "404 page not found", FastAPI (vLLM) {"detail": "Not Found"}, aiohttp
# "404: Not Found", nginx and llama.cpp HTML pages, or nothing at all.
_BARE_NOT_FOUND = re.compile(
    r"(?:404[:\s]*)?(?:page |file )?not found\.?|404|html error page(?:: .*)?", re.IGNORECASE
)
# Servers that explain a path they do not serve: OpenAI ("Invalid URL (POST /chat/completions)",
# "Unknown request URL: ...", code `unknown_url`), LM Studio ("Unexpected endpoint or method."),
# Express ("Cannot POST /chat/completions"), Azure ("Resource not found"). Checked before the
# word "model", which such a message may quote in its path.
_ENDPOINT_MESSAGE = re.compile(
    r"invalid url\b|unknown request url\b|unexpected endpoint\b|^cannot [a-z]+ /|^resource not found\.?$",
    re.IGNORECASE,
)
_LOCAL_ROOT_PATHS = frozenset({"ollama", "llamacpp", "koboldcpp"})


def not_found_error(
    body: bytes, text: str, meta: dict[str, object], *, provider: str
) -> ModelNotFound | NotFound:
    """A 404: MODEL_NOT_FOUND only when the body says the model is unknown.

    Providers that do not know a model say so (OpenAI's `code: model_not_found`, Ollama's
    `model "x" not found`, vLLM's `The model `x` does not exist`). A bare 404 means the path is
    not served, which is nearly always a base URL missing its `/v1` (Ollama, vLLM, LM Studio):
    reporting that as an unknown model sends the operator looking in the wrong place. It is
    NOT_FOUND with reason NOT_FOUND (the contract's "no such thing" row), `not_found: endpoint`
    and a hint. Any other provider message keeps MODEL_NOT_FOUND, as the contract's 404 row.
    """
    message = upstream_message(body).strip()
    code = _error_code(body)
    endpoint = code == "unknown_url" or bool(_ENDPOINT_MESSAGE.search(message))
    if code == "model_not_found" or (
        not endpoint and ("model" in message.lower() or (message and not _BARE_NOT_FOUND.fullmatch(message)))
    ):
        return ModelNotFound(text, metadata={**meta, "not_found": "model"})
    if provider in _LOCAL_ROOT_PATHS:
        hint = "check the base URL: it should be the server's root (no /v1 or other path)"
    else:
        hint = "check that the base URL ends with /v1 (e.g. http://127.0.0.1:11434/v1 for Ollama)"
    return NotFound(
        f"{provider} answered HTTP 404 for the chat path: the endpoint does not exist there; {hint}",
        metadata={**meta, "not_found": "endpoint", "hint": hint},
    )


INSUFFICIENT_QUOTA = "insufficient_quota"


# Groq's and OpenAI's wording for a request over the tokens-per-minute limit by itself ("on
# tokens per minute (TPM)", OpenAI also "on tokens per min (TPM)"). The "Rate limit reached ...
# Used N, Requested M. Please try again in 4.77s" form is an ordinary 429: waiting helps there.
_OVER_THE_MINUTE_LIMIT = re.compile(
    r"Request too large for .{0,300}?\(TPM\): Limit (\d{1,15}), Requested (\d{1,15})", re.DOTALL
)


def _over_the_minute_limit(message: str) -> tuple[int, int] | None:
    """(limit, requested) when `message` says the request alone exceeds the per-minute tokens."""
    if "Request too large" not in message:
        return None
    found = _OVER_THE_MINUTE_LIMIT.search(message)
    if found is None:
        return None
    limit, requested = int(found.group(1)), int(found.group(2))
    return (limit, requested) if requested > limit else None


def _over_the_minute_span(message: str) -> str:
    """The words of `message` that say so ("Request too large for ... (TPM): Limit N, Requested M")."""
    found = _OVER_THE_MINUTE_LIMIT.search(message)
    return " ".join(found.group(0).split()) if found else ""


# How much of a wrapped provider error (OpenRouter's `error.metadata.raw`) is read.
RAW_SCAN_CHARS = 4096


def _wrapped_raw(body: bytes) -> tuple[str, str]:
    """The provider's own error text and name that OpenRouter wraps as `{"error": {"message":
    "Provider returned error", "code": 429, "metadata": {"raw": "...", "provider_name": "..."}}}`
    ("" for none), unscrubbed: at most RAW_SCAN_CHARS characters of `raw`. A `raw` that is a JSON
    object (or its text) gives its `error.message`; any other text is taken as it is."""
    if b'"raw"' not in body:  # most error bodies: no JSON parse here
        return "", ""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", ""
    err = payload.get("error") if isinstance(payload, dict) else None
    meta = err.get("metadata") if isinstance(err, dict) else None
    if not isinstance(meta, dict):
        return "", ""
    name = meta.get("provider_name")
    name = name if isinstance(name, str) else ""
    raw = meta.get("raw")
    if isinstance(raw, str):
        raw = raw[:RAW_SCAN_CHARS]
        if raw.lstrip().startswith("{"):
            try:
                inner = orjson.loads(raw)
            except orjson.JSONDecodeError:  # cut at RAW_SCAN_CHARS, or no JSON: read as text
                return raw, name
            return _inner_message(inner) or raw, name
        return raw, name
    if isinstance(raw, dict):
        return _inner_message(raw), name
    return "", name


def _inner_message(inner: object) -> str:
    err = inner.get("error") if isinstance(inner, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return message[:RAW_SCAN_CHARS] if isinstance(message, str) else ""


def _is_quota_exhausted(body: bytes) -> bool:
    """An OpenAI-style 429 whose error code or type is `insufficient_quota`."""
    if INSUFFICIENT_QUOTA.encode() not in body[:65536]:  # most 429s: no JSON parse at all
        return False
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and INSUFFICIENT_QUOTA in (err.get("code"), err.get("type"))


def _error_code(body: bytes) -> object:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = payload.get("error") if isinstance(payload, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def connection_error(
    exc: BaseException, *, provider: str, scrub: Callable[[str], str]
) -> RetryableError | UpstreamBadResponse:
    """A transport failure: retryable (refused, reset, dropped), unless the upstream *answered*
    bytes that are no HTTP answer we accept (a head over the limits, malformed framing, an
    unsupported encoding). Those are UPSTREAM_BAD_RESPONSE and not retried: the same upstream
    answers the same garbage again, and each attempt would read up to the head limit again."""
    detail = scrub(str(exc)) or type(exc).__name__
    if isinstance(exc, InvalidResponseError):
        return UpstreamBadResponse(
            f"{provider} answered something that is not a usable HTTP answer: {detail}",
            metadata={"provider": provider, "error_type": type(exc).__name__},
        )
    error = UpstreamUnavailable(
        f"{provider} could not be reached: {detail}",
        metadata={"provider": provider, "error_type": type(exc).__name__},
    )
    return RetryableError(error, status=0)


def body_error(
    payload: Mapping[str, object], *, provider: str, scrub: Callable[[str], str]
) -> RetryableError | GatewayError:
    """A 200 (or an SSE event) that carries an `error` object instead of an answer.

    OpenRouter and some proxies answer HTTP 200 with `{"error": {"code": 429|502|..., ...}}`: a
    numeric code maps as the HTTP status would (so a 429 or 5xx in the body is retryable, and
    the caller's retry policy sees the same code it would for that status), with metadata
    `http_status` 200 and `upstream_code`; anything else is UPSTREAM_BAD_RESPONSE.
    """
    err = payload.get("error")
    code = err.get("code", err.get("status")) if isinstance(err, dict) else None
    status = http_code(code)
    raw = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS, default=str)
    if status is not None:
        return error_for_status(status, raw, {}, provider=provider, scrub=scrub, in_body=True)
    message = upstream_message(raw, scrub)
    # A string code ("context_length_exceeded") or none, but the words of a context overflow: the
    # prompt's fault, as the same object with HTTP 400 would be (routing falls back on it).
    overflow = context_overflow.overflow_error(
        400,
        raw,
        f"{provider} answered HTTP 200 with an error object: {message}",
        {"http_status": 200, "provider": provider},
    )
    if overflow is not None:
        return overflow
    return UpstreamBadResponse(
        f"{provider} answered with an error: {message}",
        metadata={"provider": provider, "upstream_code": scrub(str(code))[:100]},
    )


def error_in_body(
    payload: Mapping[str, object], *, provider: str, scrub: Callable[[str], str]
) -> GatewayError:
    """As `body_error`, when no retry is possible any more (the error the caller gets)."""
    mapped = body_error(payload, provider=provider, scrub=scrub)
    if isinstance(mapped, RetryableError):
        return mapped.error
    mapped.final = True  # no retry would help: not even before anything was relayed
    return mapped


def http_code(code: object) -> int | None:
    """An error object's `code` as an HTTP status (400-599; a number or ASCII digits), else None."""
    if isinstance(code, bool):
        return None
    if isinstance(code, str) and code.strip().isascii() and code.strip().isdigit():  # not "²"
        code = int(code.strip())
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return None
