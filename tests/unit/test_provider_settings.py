"""The Anthropic and Gemini settings: base URLs, keys from their usual variables, redaction."""

from __future__ import annotations

from server.auth.redact import Redactor
from server.config import load_settings

ANTHROPIC_KEY = "sk-ant-api03-" + "a" * 40
GEMINI_KEY = "AIzaSy" + "g" * 33


def test_keys_come_from_their_usual_variables() -> None:
    settings = load_settings(environ={"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "GEMINI_API_KEY": GEMINI_KEY})
    assert (settings.anthropic_api_key, settings.gemini_api_key) == (ANTHROPIC_KEY, GEMINI_KEY)
    assert settings.anthropic_base_url == "https://api.anthropic.com/v1"
    assert settings.google_ai_base_url == "https://generativelanguage.googleapis.com/v1beta"


def test_google_api_key_is_the_alias_and_gemini_api_key_wins() -> None:
    assert load_settings(environ={"GOOGLE_API_KEY": GEMINI_KEY}).gemini_api_key == GEMINI_KEY
    both = load_settings(environ={"GOOGLE_API_KEY": "other-key-value", "GEMINI_API_KEY": GEMINI_KEY})
    assert both.gemini_api_key == GEMINI_KEY


def test_base_urls_are_configurable_and_always_allowed() -> None:
    settings = load_settings(
        environ={
            "LLMGW_ANTHROPIC_BASE_URL": "https://claude.proxy/v1",
            "LLMGW_GOOGLE_AI_BASE_URL": "https://g.proxy/v1beta",
        }
    )
    assert "https://claude.proxy/v1" in settings.provider_base_urls()
    assert "https://g.proxy/v1beta" in settings.provider_base_urls()


def test_the_redactor_knows_the_new_keys() -> None:
    settings = load_settings(environ={"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "GOOGLE_API_KEY": GEMINI_KEY})
    redactor = Redactor.from_settings(settings)
    scrubbed = redactor.scrub(f"a={ANTHROPIC_KEY} b={GEMINI_KEY}")
    assert ANTHROPIC_KEY not in scrubbed and GEMINI_KEY not in scrubbed
