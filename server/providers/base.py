"""What every provider call needs: where to send it, with which headers, and how to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field


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
