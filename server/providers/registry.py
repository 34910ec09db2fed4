"""model_endpoint_type -> the `Provider` that speaks its dialect.

Adding a provider is one module implementing `server.providers.base.Provider` plus a line here
(and its key and base URL in `server.core.keys` and `server.config`). The local servers'
endpoint types are handled by `server.providers.local`.
"""

from __future__ import annotations

from server.config import Settings
from server.providers import anthropic, gemini
from server.providers.azure import AzureProvider
from server.providers.base import Provider
from server.providers.deepseek import DeepSeekProvider
from server.providers.groq import GroqProvider
from server.providers.openai_compat import OPENAI
from server.providers.translated import TranslatedProvider

PROVIDERS: dict[str, Provider] = {
    "openai": OPENAI,
    "anthropic": TranslatedProvider(anthropic),
    "google_ai": TranslatedProvider(gemini),
    "groq": GroqProvider(),
    "deepseek": DeepSeekProvider(),
    "azure": AzureProvider(),
}


_AZURE_BY_VERSION: dict[str, AzureProvider] = {}


def provider_for(endpoint_type: str, settings: Settings | None = None) -> Provider:
    """The provider of a validated endpoint type (validation refused unknown ones).

    With `settings`, Azure's provider uses their `azure_api_version` (one instance per version)."""
    if endpoint_type == "azure" and settings is not None:
        version = settings.azure_api_version
        provider = _AZURE_BY_VERSION.get(version)
        if provider is None:
            provider = _AZURE_BY_VERSION[version] = AzureProvider(version)
        return provider
    return PROVIDERS[endpoint_type]
