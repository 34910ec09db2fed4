"""Which tools the upstream sees and how it must use them: model/endpoint capability rules,
`tool_choice` resolution and its legacy (`function_call`) spelling.

Capability rules follow the upstream agent server's (letta) facts, matched on the lowercased
model name exactly as the caller sent it (a vendor prefix such as "openai/o3" is not stripped):

- reasoning families: names starting with o1, o3, o4 or gpt-5;
- developer role: reasoning families except o1-mini, plus o1-preview;
- temperature: not configurable for reasoning families (they only accept 1.0);
- parallel tool calls: not accepted by reasoning families.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.auth.endpoints import url_in_domain
from server.core import upstream_kind
from server.errors import FieldViolation, InvalidRequest

_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_NAMED_CHOICES = frozenset({"none", "auto", "required"})


def is_openai_reasoning_model(model: str) -> bool:
    """True for the o1/o3/o4/gpt-5 families."""
    return model.lower().startswith(_REASONING_PREFIXES)


def accepts_developer_role(model: str) -> bool:
    """True when system messages must be sent with the `developer` role."""
    m = model.lower()
    return (m.startswith(_REASONING_PREFIXES) and "o1-mini" not in m) or "o1-preview" in m


def supports_temperature_param(model: str) -> bool:
    """False for families that reject any temperature but the default 1.0."""
    return not is_openai_reasoning_model(model)


def supports_parallel_tool_calls(model: str) -> bool:
    """False for families that reject the `parallel_tool_calls` parameter."""
    return not is_openai_reasoning_model(model)


def is_nebius(endpoint: str) -> bool:
    """Nebius AI Studio (`api.studio.nebius.com`): its OpenAI-compatible server rejects strict
    schemas and `tool_choice: "required"` (the seed's rule). Matched on the parsed host, nebius.com
    or a name under it, not on the URL text."""
    return url_in_domain(endpoint, "nebius.com")


def supports_structured_output(endpoint: str) -> bool:
    """Strict function schemas are on everywhere except nebius endpoints."""
    return not is_nebius(endpoint)


def is_mlx(*, handle: str, model: str) -> bool:
    """MLX-served models.

    The seed reads a `compatibility_type == "mlx"` flag our LLMConfig does not carry; MLX models
    are published and served under names containing "mlx" (e.g. "mlx-community/Qwen3-8B-4bit",
    handle "mlx/qwen3"), so that substring in the lowercased handle or model decides.
    """
    return "mlx" in handle.lower() or "mlx" in model.lower()


def requires_auto_tool_choice(*, handle: str, endpoint: str, model: str) -> bool:
    """Servers that reject `tool_choice: "required"`: vLLM handles, nebius, MLX."""
    return "vllm" in handle.lower() or is_nebius(endpoint) or is_mlx(handle=handle, model=model)


def resolve_tool_choice(
    *,
    function_call: str,
    force_tool_call: str,
    function_names: Sequence[str],
    handle: str,
    endpoint: str,
    model: str,
) -> str | dict[str, Any] | None:
    """The `tool_choice` to send, or None to send none.

    - no functions: `function_call` is dropped (seed); a `force_tool_call` cannot be honoured
      and is an InvalidRequest;
    - `force_tool_call`, else a `function_call` outside {none, auto, required}, forces that
      function; a name that is not among the functions is an InvalidRequest;
    - none/auto/required pass through;
    - otherwise "required", or "auto" where the server needs it (`requires_auto_tool_choice`).
    """
    if force_tool_call:
        forced, field = force_tool_call, "force_tool_call"
    elif function_call and function_call not in _NAMED_CHOICES:
        if not function_names:
            return None
        forced, field = function_call, "function_call"
    else:
        if not function_names:
            return None
        if function_call:
            return function_call
        if requires_auto_tool_choice(handle=handle, endpoint=endpoint, model=model):
            return "auto"
        return "required"
    if forced not in function_names:
        description = f"names no function of the request: {forced!r}"
        raise InvalidRequest(
            f"{field} {description}",
            metadata={"field": field, "name": forced},
            field_violations=[FieldViolation(field, description)],
        )
    return {"type": "function", "function": {"name": forced}}


_NO_NAMED_CHOICE_MARKS = ("llamacpp", "llama.cpp", "llama-cpp", "llama_cpp", "llama-server")


def takes_named_tool_choice(*, handle: str, model: str, endpoint: str = "") -> bool:
    """False for llama.cpp's `llama-server` on the OpenAI-compatible path: it ignores an object
    `tool_choice` (logs "Wrong type supplied for parameter 'tool_choice'" and acts as "auto").
    Recognized by what it answered before from `endpoint` (`server.core.upstream_kind`: its
    `Server: llama.cpp` header or `timings` object), else, for a first call, by its name in the
    lowercased handle or model (e.g. handle "llamacpp/qwen2.5"). A forced call is then sent as
    the forced function alone with `tool_choice: "required"`, which it honours (see
    `build_chat_body`)."""
    if upstream_kind.is_llamacpp(endpoint):
        return False
    text = f"{handle} {model}".lower()
    return not any(mark in text for mark in _NO_NAMED_CHOICE_MARKS)


def legacy_function_call(
    tool_choice: str | dict[str, Any] | None, function_names: Sequence[str]
) -> str | dict[str, Any] | None:
    """The legacy `function_call` spelling of a resolved `tool_choice`.

    "auto"/"none" are unchanged and a forced function becomes `{"name": ...}`. "required" has no
    legacy equivalent: with exactly one function it means "call that one", so that function is
    forced; with several, "auto" is sent (the closest the legacy API can say).
    """
    if tool_choice is None or isinstance(tool_choice, str) and tool_choice != "required":
        return tool_choice
    if isinstance(tool_choice, dict):
        return {"name": tool_choice["function"]["name"]}
    if len(function_names) == 1:
        return {"name": function_names[0]}
    return "auto"
