"""A translator module (`anthropic`, `gemini`) as the gateway's `Provider`.

Those modules are pure functions over the internal (OpenAI-shaped) JSON; this one adapter gives
each the `Provider` methods, and puts their answers through the same shape checks as OpenAI's
(`checked_completion`, `ShapeChecked`), so no dialect can bypass them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from server.core.retry import RetryableError
from server.errors import GatewayError
from server.providers import base
from server.providers.openai_compat import ShapeChecked, checked_completion, load_json_object


class Translator(Protocol):
    """What a translator module defines (see server/providers/anthropic.py)."""

    # Read-only members: a module's constant and its decoder class satisfy them.
    @property
    def NAME(self) -> str: ...

    @property
    def StreamDecoder(self) -> Callable[..., base.StreamDecoder]: ...

    def endpoint_url(self, base_url: str, model: str, *, stream: bool) -> str: ...

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def build_body_with_notes(
        self, body: dict[str, Any], *, stream: bool
    ) -> tuple[dict[str, Any], list[str]]: ...

    def parse_completion(self, payload: dict[str, Any], *, model: str) -> dict[str, Any]: ...

    def error_for_status(
        self, status: int, body: bytes, headers: Mapping[str, str], *, scrub: Callable[[str], str]
    ) -> RetryableError | GatewayError: ...


class TranslatedProvider:
    """`module` as a `Provider` (server.providers.registry)."""

    def __init__(self, module: Translator) -> None:
        self._module = module
        self.name = module.NAME

    def endpoint_url(self, base_url: str, model: str, *, stream: bool) -> str:
        return self._module.endpoint_url(base_url, model, stream=stream)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return self._module.auth_headers(api_key)

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        return self._module.build_body_with_notes(body, stream=stream)

    def parse_answer(
        self, raw: bytes, *, provider: str, model: str, scrub: Callable[[str], str]
    ) -> dict[str, Any]:
        payload = load_json_object(raw, provider=provider, scrub=scrub)
        return checked_completion(self._module.parse_completion(payload, model=model), provider=provider)

    def stream_decoder(self, *, provider: str, model: str, scrub: Callable[[str], str]) -> base.StreamDecoder:
        return ShapeChecked(self._module.StreamDecoder(scrub=scrub, model=model), provider=provider)

    def error_for_status(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        *,
        provider: str,
        scrub: Callable[[str], str],
    ) -> RetryableError | GatewayError:
        return self._module.error_for_status(status, body, headers, scrub=scrub)
