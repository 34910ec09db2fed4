"""The provider seam: the registry, the OpenAI dialect, and no provider importing the gateway."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

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


_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("extra", "notes"),
    [
        ({"thinking_blocks": [{"type": "thinking"}]}, ["thinking_blocks"]),
        ({"reasoning_content": "why"}, ["messages[].reasoning_content"]),
        ({"tool_calls": [_CALL, {**_CALL, "id": "c2", "thought_signature": "s"}]}, ["thinking_blocks"]),
        ({"tool_calls": [_CALL]}, None),  # a call without a signature: nothing to leave out
        ({"tool_calls": []}, None),
    ],
)
def test_each_opaque_part_alone_is_found_in_any_message(
    extra: dict[str, Any], notes: list[str] | None
) -> None:
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assistant = {"role": "assistant", "content": None, **extra}
    body = {"model": "gpt-4o", "messages": [*plain, assistant, {"role": "user", "content": "go"}]}
    sent, got = OPENAI.build_body(body, stream=False)
    if notes is None:
        assert sent is body and got == []
        return
    assert got == notes
    out = sent["messages"][2]
    assert "thinking_blocks" not in out and "reasoning_content" not in out
    assert all("thought_signature" not in call for call in out.get("tool_calls") or ())
    assert sent["messages"][:2] == plain and sent["messages"][3] == body["messages"][3]
