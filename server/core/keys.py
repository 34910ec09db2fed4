"""Key resolution: which base URL a call goes to, and with which credentials.

The seed's rules, in order (see seed-behaviour.md, "Key resolution"), with two fixes:
- BYOK is resolved before the missing-key check, so a BYOK provider works on a server that holds
  no OpenAI key of its own.
- A server-held key is sent only to the base URL it is configured for; a client-chosen endpoint
  gets the placeholder key instead, never a real one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmgateway.v1 import chat_pb2

from server.auth.actor import Actor
from server.auth.endpoints import safe_display, url_in_domain
from server.config import Settings
from server.errors import EndpointNotAllowed, FieldViolation, InvalidRequest, MissingApiKey, NotFound
from server.providers.base import Provider, UpstreamTarget
from server.providers.openai_compat import OPENAI

# The seed sends this to keyless endpoints (local proxies) because OpenAI clients need some key.
PLACEHOLDER_API_KEY = "DUMMY_API_KEY"


@dataclass(frozen=True, slots=True)
class ByokProvider:
    """A decrypted bring-your-own-key provider of one organization."""

    name: str
    base_url: str
    api_key: str = field(repr=False)
    endpoint_type: str = "openai"
    keep: object = field(default=None, repr=False, compare=False)  # Redactor.lease of the key


class EndpointChecker(Protocol):
    def check(self, url: str, *, byok_base_urls: Sequence[str] = ()) -> str: ...

    def key_allowed_for(self, url: str, key_base_url: str) -> bool: ...

    def operator_listed(self, url: str) -> bool: ...


def private_ok(url: str, *, policy: EndpointChecker, settings: Settings) -> bool:
    """May a call to `url` reach loopback/private addresses? Only if the operator listed it.

    The operator's lists are the provider base URLs and `LLMGW_ALLOWED_ENDPOINTS` (the policy's).
    `LLMGW_LOCAL_BASE_URL` is not one: it only says where the local key may go, and a request
    reaches it only when it is listed in `LLMGW_ALLOWED_ENDPOINTS` (then `operator_listed` holds).
    Counting it here granted the private-address rule to exactly one more case: a tenant's BYOK
    base URL on the local server's (private) host name. A URL allowed only as a tenant's BYOK
    base URL reaches public addresses only, whatever its host name resolves to (`SafeResolver`
    enforces it). `settings` is kept for the callers' sake.
    """
    del settings
    return policy.operator_listed(url)


ByokLookup = Callable[[str, str], Awaitable[ByokProvider | None]]
ByokUrls = Callable[[str], Awaitable[Sequence[str]]]


async def check_endpoint(endpoint: str, *, actor: Actor, policy: EndpointChecker, byok_urls: ByokUrls) -> str:
    """The canonical URL to call, or EndpointNotAllowed when this caller may not reach it."""
    try:
        return policy.check(endpoint)
    except EndpointNotAllowed:
        # The organization's BYOK base URLs are allowed too; look them up only when needed.
        return policy.check(endpoint, byok_base_urls=await byok_urls(actor.organization_id))


@dataclass(frozen=True, slots=True)
class ServerKey:
    """A provider key the server holds: the settings fields of its base URL and key, and how the
    MISSING_API_KEY error names it."""

    base_url_field: str
    key_field: str
    label: str
    variable: str
    # The base URL's variable when it has no default (Azure): unset, the call is MISSING_API_KEY.
    base_url_variable: str = ""

    def base_url(self, settings: Settings) -> str:
        return str(getattr(settings, self.base_url_field))

    def key(self, settings: Settings) -> str:
        return str(getattr(settings, self.key_field))


_OPENAI_KEY = ServerKey("openai_base_url", "openai_api_key", "OpenAI", "OPENAI_API_KEY")
# model_endpoint_type -> its server key; any other type is OpenAI-compatible and uses OpenAI's.
# OpenRouter's (an OpenAI-compatible endpoint chosen by URL or provider name, not by type) is
# handled in `resolve_target` itself.
SERVER_KEYS = {
    "anthropic": ServerKey("anthropic_base_url", "anthropic_api_key", "Anthropic", "ANTHROPIC_API_KEY"),
    "google_ai": ServerKey("google_ai_base_url", "gemini_api_key", "Gemini", "GEMINI_API_KEY"),
    "groq": ServerKey("groq_base_url", "groq_api_key", "Groq", "GROQ_API_KEY"),
    "deepseek": ServerKey("deepseek_base_url", "deepseek_api_key", "DeepSeek", "DEEPSEEK_API_KEY"),
    "azure": ServerKey("azure_base_url", "azure_api_key", "Azure OpenAI", "AZURE_API_KEY", "AZURE_BASE_URL"),
}


def server_key(endpoint_type: str) -> ServerKey:
    return SERVER_KEYS.get(endpoint_type, _OPENAI_KEY)


def default_endpoint(config: chat_pb2.LLMConfig, settings: Settings) -> str:
    """The endpoint of a config without `model_endpoint`: the configured OpenRouter base URL for
    `provider_name == "openrouter"`, else the configured base URL of its endpoint type (BYOK: see
    below)."""
    key = server_key(config.model_endpoint_type)
    if config.provider_name == "openrouter" and key is _OPENAI_KEY:
        return settings.openrouter_base_url.rstrip("/")
    return key.base_url(settings).rstrip("/")


async def counting_endpoint(
    config: chat_pb2.LLMConfig, *, settings: Settings, actor: Actor, byok_provider: ByokLookup
) -> str:
    """The endpoint `resolve_target` would call, without checking keys or the allowlist.

    For CountTokens: the prompt depends on the endpoint (LM Studio's inner-thoughts description),
    so it must be counted for the same endpoint the guard of Create sees, including a BYOK
    provider's base URL when the request names no endpoint. Unknown BYOK provider: NotFound.
    """
    if config.model_endpoint:
        return config.model_endpoint.rstrip("/")
    if config.provider_category == chat_pb2.PROVIDER_CATEGORY_BYOK:
        provider = await byok_provider(actor.organization_id, config.provider_name)
        if provider is None:
            raise _byok_not_found(config, actor)
        return provider.base_url.rstrip("/")
    return default_endpoint(config, settings)


def _byok_type_mismatch(config: chat_pb2.LLMConfig, byok: ByokProvider) -> InvalidRequest:
    """A BYOK provider's key speaks the dialect it was stored with: called in another one, its
    key would go in the wrong header to a server that answers in another shape. Refused rather
    than silently switched, because the request's type also chose its validation and tokens."""
    field = "llm_config.model_endpoint_type"
    description = (
        f"BYOK provider {byok.name!r} was created with model_endpoint_type {byok.endpoint_type!r}; "
        "send that type"
    )
    return InvalidRequest(
        f"{field} {config.model_endpoint_type!r} does not match the provider: {description}",
        metadata={
            "field": field,
            "provider_name": byok.name,
            "model_endpoint_type": config.model_endpoint_type,
            "provider_endpoint_type": byok.endpoint_type,
        },
        field_violations=[FieldViolation(field, description)],
    )


def _byok_not_found(config: chat_pb2.LLMConfig, actor: Actor) -> NotFound:
    return NotFound(
        f"no BYOK provider named {config.provider_name!r} in this organization",
        metadata={"provider_name": config.provider_name, "organization_id": actor.organization_id},
    )


async def resolve_target(
    config: chat_pb2.LLMConfig,
    *,
    settings: Settings,
    actor: Actor,
    policy: EndpointChecker,
    byok_provider: ByokLookup,
    byok_urls: ByokUrls,
    dialect: Provider = OPENAI,
    cache: TargetCache | None = None,
) -> UpstreamTarget:
    """The upstream for a request in `dialect`, or the error that stops it.

    The key goes in `dialect`'s auth headers. `cache` (one per gateway: its settings and policy
    are fixed) remembers server-key targets allowed by the operator's lists alone; see
    `TargetCache`."""
    if cache is not None and config.provider_category != chat_pb2.PROVIDER_CATEGORY_BYOK:
        cached = cache.get(config, dialect)
        if cached is not None:
            return cached
    endpoint = config.model_endpoint.rstrip("/") or default_endpoint(config, settings)

    if config.provider_category == chat_pb2.PROVIDER_CATEGORY_BYOK:
        byok = await byok_provider(actor.organization_id, config.provider_name)
        if byok is None:
            raise _byok_not_found(config, actor)
        requested = config.model_endpoint_type  # "" only in direct calls: validation refuses it
        if byok.endpoint_type and requested and byok.endpoint_type != requested:
            raise _byok_type_mismatch(config, byok)
        base = byok.base_url.rstrip("/")
        if not config.model_endpoint:
            endpoint = base
        elif not policy.key_allowed_for(endpoint, base):
            raise EndpointNotAllowed(
                f"BYOK provider {byok.name!r} may only be called at its own base URL",
                metadata={"provider_name": byok.name, "endpoint": safe_display(endpoint)},
            )
        canonical = policy.check(endpoint, byok_base_urls=(base,)).rstrip("/")
        return UpstreamTarget(
            base_url=canonical,
            headers=dialect.auth_headers(byok.api_key),
            provider=byok.name,
            is_byok=True,
            secrets=(byok.api_key,),
            private_ok=private_ok(canonical, policy=policy, settings=settings),
            keep=byok.keep,
        )

    key = server_key(config.model_endpoint_type)
    if not endpoint:  # a provider without a default base URL (Azure) and none configured
        raise _missing_base_url(key, settings)
    try:
        canonical = policy.check(endpoint).rstrip("/")
    except EndpointNotAllowed:
        # The organization's BYOK base URLs are allowed too (as check_endpoint): the caller's
        # own, so such a target is never cached.
        cache = None
        byok_bases = await byok_urls(actor.organization_id)
        canonical = policy.check(endpoint, byok_base_urls=byok_bases).rstrip("/")
    target = _server_target(config, settings, policy, dialect, key, endpoint, canonical)
    if cache is not None:
        cache.put(config, dialect, target)
    return target


def _server_target(
    config: chat_pb2.LLMConfig,
    settings: Settings,
    policy: EndpointChecker,
    dialect: Provider,
    key: ServerKey,
    endpoint: str,
    canonical: str,
) -> UpstreamTarget:
    """The target of a server-key call to `endpoint` (allowed, as `canonical`)."""
    listed = private_ok(canonical, policy=policy, settings=settings)

    if key is not _OPENAI_KEY:
        name = config.provider_name or dialect.name
        return _server_key_target(endpoint, canonical, name, key, dialect, settings, policy, listed)

    # OpenRouter: the seed's rules (host openrouter.ai or a name under it, provider name), plus
    # anything under the configured OpenRouter base URL (which may be a proxy in front of
    # openrouter.ai). They only name the provider "openrouter" (traces, metrics, errors); its key
    # goes only under the configured base URL.
    under_openrouter = policy.key_allowed_for(endpoint, settings.openrouter_base_url)
    is_openrouter = (
        under_openrouter or url_in_domain(endpoint, "openrouter.ai") or config.provider_name == "openrouter"
    )
    if is_openrouter and settings.openrouter_api_key and under_openrouter:
        headers = dialect.auth_headers(settings.openrouter_api_key)
        if settings.openrouter_referer:
            headers["HTTP-Referer"] = settings.openrouter_referer
        if settings.openrouter_title:
            headers["X-Title"] = settings.openrouter_title
        return UpstreamTarget(
            canonical, headers, "openrouter", secrets=(settings.openrouter_api_key,), private_ok=listed
        )

    name = "openrouter" if is_openrouter else (config.provider_name or "openai")
    return _server_key_target(endpoint, canonical, name, key, dialect, settings, policy, listed)


class TargetCache:
    """Server-key targets by (model_endpoint, model_endpoint_type, provider_name, dialect).

    Only for one gateway's fixed settings and policy, and only targets whose URL the operator's
    lists allow (a URL allowed as some organization's BYOK base URL depends on the caller and
    is resolved every time); errors are never cached. Everything else `resolve_target` reads
    for such a target is fixed for the process: settings, provider base URLs and keys, the
    allowlists. An agent names the same endpoint every step, and resolving it (URL checks
    against every base, the OpenRouter rules, the auth headers) cost ~5 us a call. A target is
    shared read-only (frozen; its headers are only ever copied). Bounded: at most 1,024
    entries, endpoints of at most 2,048 characters and provider names of at most 256 (neither is
    bounded by validation: a caller's 60 MB provider_name would otherwise be kept, 1,024 times).
    """

    __slots__ = ("_targets",)
    MAX_ENTRIES = 1024
    MAX_ENDPOINT_CHARS = 2048
    MAX_PROVIDER_NAME_CHARS = 256

    def __init__(self) -> None:
        self._targets: dict[tuple[str, str, str], tuple[Provider, UpstreamTarget]] = {}

    def get(self, config: chat_pb2.LLMConfig, dialect: Provider) -> UpstreamTarget | None:
        found = self._targets.get((config.model_endpoint, config.model_endpoint_type, config.provider_name))
        if found is None or found[0] is not dialect:
            return None
        return found[1]

    def put(self, config: chat_pb2.LLMConfig, dialect: Provider, target: UpstreamTarget) -> None:
        if (
            len(config.model_endpoint) > self.MAX_ENDPOINT_CHARS
            or len(config.provider_name) > self.MAX_PROVIDER_NAME_CHARS
        ):
            return
        if len(self._targets) >= self.MAX_ENTRIES:
            self._targets.clear()
        self._targets[(config.model_endpoint, config.model_endpoint_type, config.provider_name)] = (
            dialect,
            target,
        )

    def __len__(self) -> int:
        return len(self._targets)


def _missing_base_url(key: ServerKey, settings: Settings) -> MissingApiKey:
    missing = [key.base_url_field] + ([] if key.key(settings) else [key.key_field])
    variables = [key.base_url_variable or key.base_url_field.upper()] + (
        [] if key.key(settings) else [key.variable]
    )
    return MissingApiKey(
        f"no {key.label} endpoint is configured (set {' and '.join(variables)}, or name model_endpoint "
        "or a BYOK provider)",
        metadata={"missing_fields": ",".join(missing)},
    )


def _server_key_target(
    endpoint: str,
    canonical: str,
    name: str,
    key: ServerKey,
    dialect: Provider,
    settings: Settings,
    policy: EndpointChecker,
    listed: bool,
) -> UpstreamTarget:
    """The server's key under its own base URL; MISSING_API_KEY at the official endpoint without
    one; anywhere else the placeholder key (a server key never goes to a client-chosen URL)."""
    base_url = key.base_url(settings)
    if policy.key_allowed_for(endpoint, base_url):
        value = key.key(settings)
        if value:
            return UpstreamTarget(
                canonical, dialect.auth_headers(value), dialect.name, secrets=(value,), private_ok=listed
            )
        if canonical == policy.check(base_url).rstrip("/"):
            raise MissingApiKey(
                f"no {key.label} API key is configured for the official endpoint (set {key.variable})",
                metadata={"missing_fields": key.key_field, "endpoint": safe_display(endpoint)},
            )
    return UpstreamTarget(canonical, dialect.auth_headers(PLACEHOLDER_API_KEY), name, private_ok=listed)
