"""Function definitions as the local wrappers, grammars and DeepSeek prompts see them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.core.inner_thoughts import INNER_THOUGHTS_DESCRIPTION, add_inner_thoughts
from server.errors import FieldViolation, InvalidRequest


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function: its name, description and JSON-schema parameters object."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def properties(self) -> dict[str, Any]:
        props = self.parameters.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def required(self) -> list[str]:
        req = self.parameters.get("required")
        return [r for r in req if isinstance(r, str)] if isinstance(req, list) else []

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def normalize_functions(functions: Sequence[Mapping[str, Any]]) -> list[FunctionSpec]:
    """Accept bare function dicts or OpenAI tool dicts (`{"type": "function", "function": {...}}`)."""
    specs: list[FunctionSpec] = []
    for i, raw in enumerate(functions):
        inner = raw.get("function") if raw.get("type") == "function" else raw
        if not isinstance(inner, Mapping):
            raise _bad_function(i, "a function must be an object")
        name = inner.get("name")
        if not isinstance(name, str) or not name:
            raise _bad_function(i, "a function needs a non-empty name")
        description = inner.get("description") or ""
        parameters = inner.get("parameters") or {}
        if not isinstance(description, str) or not isinstance(parameters, Mapping):
            raise _bad_function(i, "description must be a string and parameters a JSON schema object")
        specs.append(FunctionSpec(name=name, description=description, parameters=dict(parameters)))
    return specs


def with_inner_thoughts(spec: FunctionSpec, *, first: bool = True) -> FunctionSpec:
    """The function with the required string kwarg `thinking`, first or last.

    The same injection (and rule) as the OpenAI-compatible path: a caller's own `thinking`
    property is replaced, since unpacking pops it from the answer anyway.
    """
    function = add_inner_thoughts(spec.as_dict(), first=first, description=INNER_THOUGHTS_DESCRIPTION)
    return FunctionSpec(name=spec.name, description=spec.description, parameters=function["parameters"])


def specs_for_prompt(
    functions: Sequence[Mapping[str, Any]],
    *,
    put_inner_thoughts_in_kwargs: bool,
    put_inner_thoughts_first: bool,
) -> list[FunctionSpec]:
    """The functions as the model is shown them (with `thinking` when inner thoughts go in kwargs)."""
    specs = normalize_functions(functions)
    if put_inner_thoughts_in_kwargs:
        specs = [with_inner_thoughts(s, first=put_inner_thoughts_first) for s in specs]
    return specs


def _bad_function(index: int, description: str) -> InvalidRequest:
    return InvalidRequest(
        f"functions[{index}]: {description}",
        field_violations=[FieldViolation(field=f"functions[{index}]", description=description)],
    )
