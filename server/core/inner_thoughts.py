"""Inner thoughts carried as a function argument ("put_inner_thoughts_in_kwargs").

On the way out every function gets a required string argument `thinking`, first (or last);
on the way back it is popped from every tool call of every choice and becomes the message
content.

Unpacking decisions:
- every tool call of a choice is unpacked (the seed did only the first); the thoughts are
  joined with "\\n" in call order; the legacy `function_call` of a message counts as one call;
- `thinking` is looked up first, then the older `inner_thoughts`; both are removed;
- a call without the argument is left alone, with a warning;
- existing non-empty content is overwritten by the thoughts, with a warning, as the seed does:
  an agent reads the content of a kwargs-thoughts answer as the thoughts, so merging would
  feed it text from two sources as one monologue;
- arguments that are not JSON raise `UpstreamBadResponse` (choice and call index in the
  metadata; the text itself is not echoed); JSON that is not an object is left alone;
- except in a choice that stopped for length (`finish_reason` "length"/"max_tokens"): there
  the model was cut off mid-call, which is an answer, not a broken upstream (and a retry would
  be billed again for the same cut). Such a call keeps its arguments exactly as the model wrote
  them (no thoughts popped, content untouched) and the caller sees FINISH_REASON_LENGTH;
- only arguments that lost a kwarg are re-serialized (compact JSON), the rest keep their text;
  arguments nested too deep to re-serialize (about 1,000 levels) are left as written.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from server.auth.endpoints import url_host_port
from server.core.exact_json import dump_exact
from server.errors import UpstreamBadResponse

logger = logging.getLogger(__name__)

INNER_THOUGHTS_KWARG = "thinking"
LEGACY_INNER_THOUGHTS_KWARG = "inner_thoughts"
# finish_reason values meaning "stopped at the token limit" (server.core.completion maps both).
_LENGTH_STOPS = frozenset({"length", "max_tokens"})
INNER_THOUGHTS_DESCRIPTION = "Deep inner monologue private to you only."
INNER_THOUGHTS_DESCRIPTION_GO_FIRST = (
    "Deep inner monologue private to you only. Think before you act, so always generate arg "
    f"'{INNER_THOUGHTS_KWARG}' first before any other arg."
)


# LM Studio's default port (the seed's rule: the models it serves need to be told to write the
# thoughts first). Matched on the parsed port, not on the URL text (`:12345` is not LM Studio).
LM_STUDIO_PORT = 1234


def is_lm_studio(endpoint: str) -> bool:
    """Whether the endpoint's port is LM Studio's default."""
    where = url_host_port(endpoint)
    return where is not None and where[1] == LM_STUDIO_PORT


def add_inner_thoughts(function: dict[str, Any], *, first: bool, description: str) -> dict[str, Any]:
    """A copy of `function` with the required `thinking` string argument (input untouched).

    Copies only the containers it changes (the function, its parameters, properties and
    required list); property schemas are shared with the input. A caller property named
    `thinking` is replaced: unpacking would remove it from the answer anyway.
    """
    params = function.get("parameters") or {}
    properties = params.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required_in = params.get("required")
    required_in = required_in if isinstance(required_in, list) else []
    thought = {"type": "string", "description": description}
    others = {k: v for k, v in properties.items() if k != INNER_THOUGHTS_KWARG}
    new_properties = (
        {INNER_THOUGHTS_KWARG: thought, **others} if first else {**others, INNER_THOUGHTS_KWARG: thought}
    )
    required = [r for r in required_in if r != INNER_THOUGHTS_KWARG]
    if first:
        required.insert(0, INNER_THOUGHTS_KWARG)
    else:
        required.append(INNER_THOUGHTS_KWARG)
    new_params = {
        **params,
        "type": params.get("type", "object"),
        "properties": new_properties,
        "required": required,
    }
    return {**function, "parameters": new_params}


def unpack_inner_thoughts(completion: dict[str, Any]) -> None:
    """Move the kwarg out of every call of every choice of a ChatCompletion dict, in place."""
    choices = completion.get("choices")
    if choices is None:
        return
    if not isinstance(choices, list):
        raise UpstreamBadResponse(
            "upstream completion has a non-list 'choices'", metadata={"field": "choices"}
        )
    for ci, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        calls: list[dict[str, Any]] = []
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                calls.append(fn if isinstance(fn, dict) else {})
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            calls.append(legacy)
        if not calls:
            continue
        cut = choice.get("finish_reason") in _LENGTH_STOPS
        thoughts: list[str] = []
        for ti, fn in enumerate(calls):
            if cut and not _is_json_text(fn.get("arguments")):
                continue  # cut off mid-call: returned as written, see the module docstring
            thought = _pop_thought(fn, ci, ti)
            if thought:
                thoughts.append(thought)
        if thoughts:
            content = message.get("content")
            if content:
                logger.warning(
                    "choice %d: content (%d chars) overwritten by the inner thoughts of its tool calls",
                    ci,
                    len(content) if isinstance(content, str) else -1,
                    extra={"choice_index": ci},
                )
            message["content"] = "\n".join(thoughts)


def _is_json_text(arguments: object) -> bool:
    if not isinstance(arguments, str):
        return False
    try:
        orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return False
    return True


def _without_thoughts(args: dict[str, Any]) -> None:
    args.pop(INNER_THOUGHTS_KWARG, None)
    args.pop(LEGACY_INNER_THOUGHTS_KWARG, None)


def _dump_exact(original: str, args: dict[str, Any]) -> str:
    """The arguments without the thoughts, numbers exact (`server.core.exact_json`)."""
    return dump_exact(original, args, _without_thoughts)


def _pop_thought(fn: dict[str, Any], ci: int, ti: int) -> str | None:
    arguments = fn.get("arguments")
    name = fn.get("name")
    if not isinstance(arguments, str):
        raise UpstreamBadResponse(
            f"tool call {ti} of choice {ci} has no arguments text",
            metadata={"choice_index": ci, "tool_call_index": ti, "function_name": name},
        )
    try:
        args = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse(
            f"arguments of tool call {ti} of choice {ci} are not valid JSON",
            metadata={"choice_index": ci, "tool_call_index": ti, "function_name": name},
        ) from None
    if not isinstance(args, dict) or (
        INNER_THOUGHTS_KWARG not in args and LEGACY_INNER_THOUGHTS_KWARG not in args
    ):
        logger.warning(
            "choice %d, tool call %d (%s): no inner-thoughts argument",
            ci,
            ti,
            name,
            extra={"choice_index": ci, "tool_call_index": ti, "function_name": name},
        )
        return None
    thought = args.pop(INNER_THOUGHTS_KWARG, None)
    legacy = args.pop(LEGACY_INNER_THOUGHTS_KWARG, None)
    if thought is None:
        thought = legacy
    try:
        fn["arguments"] = _dump_exact(arguments, args)
    except RecursionError:
        # Valid JSON nested past what the serializers write: returned as the model wrote it.
        logger.warning(
            "choice %d, tool call %d (%s): arguments nest too deep to unpack the inner thoughts",
            ci,
            ti,
            name,
            extra={"choice_index": ci, "tool_call_index": ti, "function_name": name},
        )
        return None
    if thought is None or isinstance(thought, str):
        return thought
    return orjson.dumps(thought).decode()
