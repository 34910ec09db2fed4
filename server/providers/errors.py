"""Translate what an upstream answered (status, body, transport failure) into gateway errors."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping

import orjson

from server.core.retry import RetryableError, parse_retry_after
from server.errors import (
    GatewayError,
    ModelNotFound,
    NotFound,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)

MAX_MESSAGE_CHARS = 1000
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


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
        text = body[: MAX_MESSAGE_CHARS * 4].decode("utf-8", "replace").strip()
        if text.lower().startswith(("<!doctype", "<html", "<head", "<body")):
            title = _TITLE.search(body[:65536])
            name = " ".join(html.unescape(title.group(1).decode("utf-8", "replace")).split()) if title else ""
            text = f"HTML error page: {name}" if name else "HTML error page"
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
    text = f"{provider} answered HTTP {status}"
    if message:
        text += f": {message}"
    if status == 429:
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
        return UpstreamRejected(text, metadata=meta)
    return UpstreamBadResponse(text, metadata=meta)


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


def _error_code(body: bytes) -> object:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = payload.get("error") if isinstance(payload, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def connection_error(exc: BaseException, *, provider: str, scrub: Callable[[str], str]) -> RetryableError:
    detail = scrub(str(exc)) or type(exc).__name__
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
    numeric code maps as the HTTP status would (so a 429 or 5xx in the body is retryable);
    anything else is UPSTREAM_BAD_RESPONSE with the provider's message.
    """
    err = payload.get("error")
    code = err.get("code", err.get("status")) if isinstance(err, dict) else None
    status = _http_code(code)
    raw = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS, default=str)
    if status is not None:
        return error_for_status(status, raw, {}, provider=provider, scrub=scrub)
    message = scrub(upstream_message(raw))
    return UpstreamBadResponse(
        f"{provider} answered with an error: {message}",
        metadata={"provider": provider, "upstream_code": scrub(str(code))[:100]},
    )


def error_in_body(
    payload: Mapping[str, object], *, provider: str, scrub: Callable[[str], str]
) -> GatewayError:
    """As `body_error`, when no retry is possible any more (the error the caller gets)."""
    mapped = body_error(payload, provider=provider, scrub=scrub)
    return mapped.error if isinstance(mapped, RetryableError) else mapped


def _http_code(code: object) -> int | None:
    if isinstance(code, bool):
        return None
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code.strip())
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return None
