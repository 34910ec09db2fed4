"""The provider seam: the registry, the OpenAI dialect, and no provider importing the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

from server.core.validation import KNOWN_TYPES
from server.providers.openai_compat import OPENAI
from server.providers.registry import PROVIDERS, provider_for

PROVIDERS_DIR = Path(__file__).resolve().parents[2] / "server" / "providers"


def test_every_registered_provider_is_a_known_endpoint_type() -> None:
    assert {"openai", "anthropic", "google_ai"} <= set(PROVIDERS)
    assert set(PROVIDERS) <= KNOWN_TYPES
    for endpoint_type, provider in PROVIDERS.items():
        assert provider_for(endpoint_type) is provider
        assert provider.name == endpoint_type


def test_no_provider_module_imports_the_gateway() -> None:
    for path in PROVIDERS_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "server.gateway", path
            elif isinstance(node, ast.Import):
                assert all(alias.name != "server.gateway" for alias in node.names), path


def test_openai_body_is_sent_as_built() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    sent, notes = OPENAI.build_body(body, stream=False)
    assert sent is body and notes == []


def test_openai_body_leaves_out_other_providers_opaque_parts() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
        "thought_signature": "s",
    }
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
        "thinking_blocks": [{"type": "thinking"}],
    }
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}, assistant]}
    sent, notes = OPENAI.build_body(body, stream=False)
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert notes == ["thinking_blocks"]
    assert "thinking_blocks" in assistant and "thought_signature" in call  # the internal body is untouched
