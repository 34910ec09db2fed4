"""Translate what an upstream answered (status, body, transport failure) into gateway errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import orjson

from server.core.retry import RetryableError, parse_retry_after
from server.errors import (
    GatewayError,
    ModelNotFound,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)

MAX_MESSAGE_CHARS = 1000


def upstream_message(body: bytes) -> str:
    """The provider's own error message, from the usual JSON shapes or the raw text."""
    text = ""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("msg") or err)
        elif err is not None:
            text = str(err)
    if not text:
        text = body.decode("utf-8", "replace").strip()
        if text.lstrip().lower().startswith(("<!doctype", "<html")):
            text = "HTML error page"
    return text[:MAX_MESSAGE_CHARS]


def error_for_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    provider: str,
    scrub: Callable[[str], str],
) -> RetryableError | GatewayError:
    """The error for a non-2xx answer; RetryableError when a retry may help."""
    message = scrub(upstream_message(body))
    meta = {"http_status": status, "provider": provider}
    text = f"{provider} answered HTTP {status}: {message}" if message else f"{provider} answered HTTP {status}"
    if status == 429:
        retry_after = parse_retry_after(headers)
        return RetryableError(
            RateLimitExceeded(text, metadata=meta, retry_delay=retry_after if retry_after is not None else 1.0),
            status=status,
            retry_after=retry_after,
        )
    if status in (401, 403):
        return UpstreamAuthFailed(text, metadata=meta)
    if status == 404:
        return ModelNotFound(text, metadata=meta)
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(headers)
        return RetryableError(
            UpstreamUnavailable(text, metadata=meta, retry_delay=retry_after),
            status=status,
            retry_after=retry_after,
        )
    if 400 <= status < 500:
        return UpstreamRejected(text, metadata=meta)
    return UpstreamBadResponse(text, metadata=meta)


def connection_error(exc: BaseException, *, provider: str, scrub: Callable[[str], str]) -> RetryableError:
    detail = scrub(str(exc)) or type(exc).__name__
    error = UpstreamUnavailable(
        f"{provider} could not be reached: {detail}",
        metadata={"provider": provider, "error_type": type(exc).__name__},
    )
    return RetryableError(error, status=0)


def error_in_body(payload: Mapping[str, object], *, provider: str, scrub: Callable[[str], str]) -> GatewayError:
    """A 200 (or an SSE event) that carries an `error` object instead of an answer."""
    err = payload.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    message = scrub(upstream_message(orjson.dumps(payload)))
    if isinstance(code, int) and 400 <= code < 600:
        mapped = error_for_status(code, orjson.dumps(payload), {}, provider=provider, scrub=scrub)
        return mapped.error if isinstance(mapped, RetryableError) else mapped
    return UpstreamBadResponse(
        f"{provider} answered with an error: {message}", metadata={"provider": provider, "upstream_code": code}
    )
