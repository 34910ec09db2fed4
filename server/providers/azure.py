"""Azure OpenAI: the OpenAI Chat Completions dialect under an Azure resource, `api-key` auth.

Two URL forms, chosen by the base URL (`AZURE_BASE_URL` or a BYOK provider's base URL):
- a base URL whose path ends in `/openai/v1` (e.g. `https://res.openai.azure.com/openai/v1`) is
  the v1 API: `POST {base}/chat/completions`, no `api-version`, the model (deployment name) in
  the body;
- any other base URL is the resource (e.g. `https://res.openai.azure.com`, or the same ending
  in `/openai`): `POST {resource}/openai/deployments/{model}/chat/completions?api-version=V`,
  where the model name is the deployment and V is `AZURE_API_VERSION` (default `2024-10-21`, the
  latest GA data-plane version). The body is the same in both forms (the model stays in it; the
  deployment form ignores it).

Errors: as OpenAI's, plus Azure's two 400s: `code: context_length_exceeded` is
CONTEXT_WINDOW_EXCEEDED (so agents summarize) and `code: content_filter` (the prompt tripped the
content filter) is UPSTREAM_REJECTED with `upstream_code: content_filter` and the filtered
categories in the metadata. An answer the filter stopped comes back with finish reason
`content_filter` (FINISH_REASON_CONTENT_FILTER), never as an empty STOP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from server.core.retry import RetryableError
from server.errors import ContextWindowExceeded, GatewayError, UpstreamRejected
from server.providers import errors
from server.providers.openai_compat import OpenAICompatible

DEFAULT_API_VERSION = "2024-10-21"


def is_v1(base_url: str) -> bool:
    """Does `base_url` name Azure's v1 API (its path ends in `/openai/v1`)?"""
    return urlsplit(base_url).path.rstrip("/").lower().endswith("/openai/v1")


class AzureProvider(OpenAICompatible):
    """OpenAI-compatible body and answers; Azure's URLs, `api-key` header and error codes."""

    name = "azure"

    def __init__(self, api_version: str = DEFAULT_API_VERSION) -> None:
        self.api_version = api_version or DEFAULT_API_VERSION

    def endpoint_url(self, base_url: str, model: str, *, stream: bool) -> str:
        base = base_url.rstrip("/")
        if is_v1(base):
            return base + "/chat/completions"
        if not urlsplit(base).path.lower().endswith("/openai"):
            base += "/openai"
        deployment = quote(model, safe="")
        return (
            f"{base}/deployments/{deployment}/chat/completions?api-version={quote(self.api_version, safe='')}"
        )

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def error_for_status(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        *,
        provider: str,
        scrub: Callable[[str], str],
    ) -> RetryableError | GatewayError:
        if status == 400:
            err = _error_object(body)
            code = err.get("code")
            if code in ("context_length_exceeded", "content_filter"):
                message = errors.upstream_message(body, scrub)
                meta: dict[str, object] = {"http_status": status, "provider": provider, "upstream_code": code}
                if code == "context_length_exceeded":
                    return ContextWindowExceeded(
                        f"{provider}: the prompt is longer than the model's context window: {message}",
                        metadata=meta,
                    )
                categories = _filtered_categories(err)
                if categories:
                    meta["content_filter"] = ",".join(categories)
                return UpstreamRejected(
                    f"{provider}: Azure's content filter blocked the prompt: {message}", metadata=meta
                )
        return super().error_for_status(status, body, headers, provider=provider, scrub=scrub)


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    err = payload.get("error") if isinstance(payload, dict) else None
    return err if isinstance(err, dict) else {}


def _filtered_categories(err: dict[str, Any]) -> list[str]:
    """The categories Azure says it filtered (`innererror.content_filter_result`)."""
    inner = err.get("innererror")
    result = inner.get("content_filter_result") if isinstance(inner, dict) else None
    if not isinstance(result, dict):
        return []
    return sorted(
        str(name)[:40]
        for name, verdict in result.items()
        if isinstance(verdict, dict) and verdict.get("filtered") is True
    )[:10]
