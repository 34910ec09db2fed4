"""What every provider call needs: where to send it, with which headers, and how to reach it;
and the `Provider` protocol each upstream dialect implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.core.retry import RetryableError
from server.errors import GatewayError


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """A resolved upstream: base URL and headers (credentials included), ready to call."""

    base_url: str  # without trailing slash
    headers: dict[str, str] = field(repr=False)
    provider: str  # "openai", "openrouter", a BYOK provider name, or the local endpoint type
    is_byok: bool = False
    # Secrets in play for this call, scrubbed from anything the call produces (errors, traces).
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # The operator listed this base URL (EndpointPolicy.operator_listed): it may resolve to
    # loopback or private addresses. False (the safe default) allows public addresses only.
    private_ok: bool = False
    # Held for the call's lifetime: keeps its BYOK key known to the redactor (`Redactor.lease`)
    # even if the provider's entry is replaced, deleted or evicted while the call runs.
    keep: object = field(default=None, repr=False, compare=False)


class StreamDecoder(Protocol):
    """One streamed answer's SSE events -> the internal (OpenAI `chat.completion.chunk`) dicts.

    A None in a returned list means the answer is complete (OpenAI `[DONE]`, Anthropic
    `message_stop`); `finish` is called at the end of the body (Gemini sends no end marker).
    An error the stream carries is raised, never turned into a short answer.
    """

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]: ...

    def finish(self) -> list[dict[str, Any] | None]: ...


class Provider(Protocol):
    """One upstream dialect. The gateway speaks the internal (OpenAI-shaped) JSON and calls these
    at the edges; the HTTP, retry and SSE plumbing (`openai_compat`) is shared by all of them.

    Usage comes out of `parse_answer` and the decoder already normalized (`prompt_tokens`
    including cached and cache-write tokens), so the gateway never sees a provider's own counts.
    Adding a provider is one module implementing this plus a line in `registry`.
    """

    name: str  # the model_endpoint_type

    def endpoint_url(self, base_url: str, model: str, *, stream: bool) -> str:
        """The URL to POST to; never carries a key."""
        ...

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        """The upstream body from the internal one, and the parameters not sent as given."""
        ...

    def parse_answer(
        self, raw: bytes, *, provider: str, model: str, scrub: Callable[[str], str]
    ) -> dict[str, Any]:
        """A unary answer's body -> internal ChatCompletion JSON (an error body raises its error)."""
        ...

    def stream_decoder(self, *, provider: str, model: str, scrub: Callable[[str], str]) -> StreamDecoder: ...

    def error_for_status(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        *,
        provider: str,
        scrub: Callable[[str], str],
    ) -> RetryableError | GatewayError:
        """An HTTP error status -> the contract's error (RetryableError when waiting may help)."""
        ...
