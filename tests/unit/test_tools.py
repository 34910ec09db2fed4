"""Tool-choice resolution, its legacy spelling, and the model/endpoint capability rules."""

from __future__ import annotations

from typing import Any

import pytest

from server.core import tools
from server.errors import InvalidRequest

NAMES = ("send_message", "search")
OPENAI = "https://api.openai.com/v1"


def forced(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("default required", {}, "required"),
        ("vllm handle auto", {"handle": "vllm/qwen"}, "auto"),
        ("vllm handle any case", {"handle": "VLLM/qwen"}, "auto"),
        ("nebius endpoint auto", {"endpoint": "https://api.studio.nebius.com/v1"}, "auto"),
        ("mlx model auto", {"model": "mlx-community/Qwen3-8B-4bit"}, "auto"),
        ("mlx handle auto", {"handle": "mlx/qwen3"}, "auto"),
        ("explicit auto", {"function_call": "auto"}, "auto"),
        ("explicit none", {"function_call": "none"}, "none"),
        ("explicit required on vllm", {"function_call": "required", "handle": "vllm/q"}, "required"),
        ("named function_call forces", {"function_call": "search"}, forced("search")),
        ("force_tool_call forces", {"force_tool_call": "search"}, forced("search")),
        (
            "force_tool_call beats function_call",
            {"function_call": "none", "force_tool_call": "search"},
            forced("search"),
        ),
        (
            "force_tool_call beats named",
            {"function_call": "send_message", "force_tool_call": "search"},
            forced("search"),
        ),
        ("force on vllm still forces", {"force_tool_call": "search", "handle": "vllm/q"}, forced("search")),
        ("no functions: function_call dropped", {"function_call": "auto", "function_names": ()}, None),
        ("no functions: named dropped", {"function_call": "search", "function_names": ()}, None),
        ("no functions, nothing asked", {"function_names": ()}, None),
    ],
)
def test_resolve_tool_choice(case: str, kwargs: dict[str, Any], expected: object) -> None:
    args: dict[str, Any] = {
        "function_call": "",
        "force_tool_call": "",
        "function_names": NAMES,
        "handle": "openai/gpt-4o",
        "endpoint": OPENAI,
        "model": "gpt-4o",
    }
    args.update(kwargs)
    assert tools.resolve_tool_choice(**args) == expected, case


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"force_tool_call": "nope"}, "force_tool_call"),
        ({"function_call": "nope"}, "function_call"),
        ({"force_tool_call": "search", "function_names": ()}, "force_tool_call"),
    ],
)
def test_forced_name_must_be_a_function(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "function_call": "",
        "force_tool_call": "",
        "function_names": NAMES,
        "handle": "",
        "endpoint": OPENAI,
        "model": "gpt-4o",
    }
    args.update(kwargs)
    with pytest.raises(InvalidRequest) as info:
        tools.resolve_tool_choice(**args)
    err = info.value
    assert err.reason == "INVALID_REQUEST"
    assert [v.field for v in err.field_violations] == [field]
    assert err.metadata["field"] == field


@pytest.mark.parametrize(
    ("choice", "names", "expected"),
    [
        (None, NAMES, None),
        ("auto", NAMES, "auto"),
        ("none", NAMES, "none"),
        (forced("search"), NAMES, {"name": "search"}),
        ("required", ("only",), {"name": "only"}),
        ("required", NAMES, "auto"),
    ],
)
def test_legacy_function_call(choice: Any, names: tuple[str, ...], expected: object) -> None:
    assert tools.legacy_function_call(choice, names) == expected


@pytest.mark.parametrize(
    ("model", "reasoning", "developer", "temperature"),
    [
        ("gpt-4o", False, False, True),
        ("gpt-4o-mini", False, False, True),
        ("gpt-4.1", False, False, True),
        ("o1", True, True, False),
        ("o1-mini", True, False, False),
        ("o1-mini-2024-09-12", True, False, False),
        ("o1-preview", True, True, False),
        ("o3-mini", True, True, False),
        ("o4-mini", True, True, False),
        ("gpt-5", True, True, False),
        ("gpt-5-mini", True, True, False),
        ("GPT-5", True, True, False),
        ("qwen2.5", False, False, True),
        ("openai/o3", False, False, True),  # prefixes are not stripped (documented)
    ],
)
def test_model_families(model: str, reasoning: bool, developer: bool, temperature: bool) -> None:
    assert tools.is_openai_reasoning_model(model) is reasoning
    assert tools.accepts_developer_role(model) is developer
    assert tools.supports_temperature_param(model) is temperature
    assert tools.supports_parallel_tool_calls(model) is not reasoning


def test_structured_output_off_for_nebius_only() -> None:
    assert tools.supports_structured_output(OPENAI)
    assert tools.supports_structured_output("http://localhost:1234/v1")
    assert not tools.supports_structured_output("https://api.studio.nebius.com/v1/")
