"""The JSON body of `POST {endpoint}/chat/completions`, and the inner-thoughts unpacking of
its answer.

Body, in this key order (absent keys are not sent):
    model, messages,
    tools + tool_choice + parallel_tool_calls (false; not for reasoning families)
        (a forced call to llama.cpp's server: the forced tool alone, tool_choice "required")
        or, when use_tool_naming is false, functions + function_call,
    max_completion_tokens (from llm_config.max_tokens), temperature, reasoning_effort,
    top_p, seed, stop, frequency_penalty, presence_penalty, response_format (each when set),
    user (from user_id), stream + stream_options {"include_usage": true} (streaming only).

Temperature: sent when the caller set one; the o1/o3/o4/gpt-5 families get 1.0 instead,
the only value they accept. `parallel_tool_calls` is the caller's `llm_config.parallel_tool_calls`,
else false, which mirrors the seed's payload preparation (its agents expect one call per step;
unpacking handles several anyway).

Function preparation (Struct -> dict, inner-thoughts injection, strict conversion) is cached
per function, keyed on the function's serialized proto bytes plus the options that change the
result: agents resend identical tool sets on every step. The cached dicts are shared between
requests: callers must treat the `tools`/`functions` entries of a body and the result of
`prompt_functions` as read-only (serialize them, never mutate them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from llmgateway.v1 import chat_pb2

from server.core import inner_thoughts, tools
from server.core.config_cache import MAX_CACHED_CONFIG_BYTES, ConfigCache
from server.core.messages import function_to_dict, struct_to_dict, to_openai_messages
from server.core.strict_schema import Restore, restore_absent, strict_with_restore
from server.core.tokens import SharedFunctionList
from server.core.validation import (
    MAX_CACHED_FUNCTION_BYTES,
    MAX_HELD_FUNCTION_BYTES,
    FunctionKeys,
    MessageFields,
    cacheable,
    function_keys,
    list_bytes,
)
from server.errors import FieldViolation, InvalidRequest


# The caches of prepared functions are keyed by the functions' bytes, which a caller chooses: a
# bound on entries alone let distinct ~1 MiB functions (a parameters Struct may be up to 1 MiB)
# pin 2,048 keys of 1 MiB and their converted dicts (several times that) in each cache, GBs from
# a few 64 MiB requests. So each is bounded in the key bytes it holds too; a function (or a
# list) past its entry bound is prepared anew on every request that carries it, as the huge
# sets already were (their work runs in the offload pool).
def _function_cache(max_entries: int) -> ConfigCache[Any, Any]:
    return ConfigCache(max_entries, MAX_HELD_FUNCTION_BYTES, MAX_CACHED_FUNCTION_BYTES)


# Inner-thoughts variants, part of the cache keys.
_NO_THOUGHTS, _FIRST, _LAST, _FIRST_LM, _LAST_LM = range(5)

# key (fn bytes, thoughts variant) -> function dict as counted and (non-strict) sent
_PROMPT_CACHE: ConfigCache[tuple[bytes, int], dict[str, Any]] = _function_cache(2048)


class SentFunctions(list[dict[str, Any]]):
    """The `tools`/`functions` list of a body (serialized as a plain list), with `restores`:
    by function name, what undoes the nulls strict conversion added (None when it added none,
    so the answer is not walked at all).

    `shared`: the list is the cached one (`_SENT_LISTS`), sent unchanged on every step of an
    agent; `json` then serializes it once for all those bodies (see `json`)."""

    __slots__ = ("restores", "shared", "_json")

    def __init__(
        self, entries: list[dict[str, Any]], restores: dict[str, Restore] | None, *, shared: bool = False
    ) -> None:
        super().__init__(entries)
        self.restores = restores
        self.shared = shared
        self._json: orjson.Fragment | bool = False  # False: not made yet; True: too large to keep

    def json(self) -> orjson.Fragment | None:
        """The list as orjson serializes it (`orjson.dumps(list(self))`), made once: a body that
        embeds this fragment serializes to the same bytes as one that holds the list, and the
        many small dicts of a tool set were ~70% of serializing a typical body. Only for a shared
        list (its dicts are read-only, as every cached function's); an exact copy, as orjson's
        output keeps its ~8x working buffer (`gateway._translated`). Two threads making it at
        once make the same bytes. None past MAX_KEPT_TOOLS_JSON_BYTES: the list is then
        serialized with each body, as an unshared one is."""
        found = self._json
        if found is False:
            raw = orjson.dumps(self)
            if len(raw) > MAX_KEPT_TOOLS_JSON_BYTES:
                self._json = True
                return None
            found = self._json = orjson.Fragment(memoryview(raw).tobytes())
        return None if found is True else found


# The largest cached tool list kept as JSON too. Its JSON is not bounded by its key: tiny
# functions grow ~45x with inner thoughts and strict form (1,000 of them: ~6 KB of keys, ~260 KB
# of JSON), and each of the 1,024 cached lists would hold that much again. At this bound the
# fragments hold at most 64 MiB; a typical agent's tool set (tens of KB) stays well under it.
MAX_KEPT_TOOLS_JSON_BYTES = 64 * 1024


# key (fn bytes, thoughts variant, strict, tools-shape) -> (entry of `tools` or `functions`,
# the Restore of its strict form or None)
_SENT_CACHE: ConfigCache[tuple[bytes, int, bool, bool], tuple[dict[str, Any], Restore | None]] = (
    _function_cache(2048)
)
# The same, per whole function list (an agent sends the same list every step).

_PROMPT_LISTS: ConfigCache[tuple[FunctionKeys, int], list[dict[str, Any]]] = _function_cache(1024)
_SENT_LISTS: ConfigCache[tuple[FunctionKeys, int, bool, bool], SentFunctions] = _function_cache(1024)


def clear_caches() -> None:
    """Forget every prepared function (tests; a warning is logged once per cache miss)."""
    _PROMPT_CACHE.clear()
    _SENT_CACHE.clear()
    _PROMPT_LISTS.clear()
    _SENT_LISTS.clear()
    _CONFIG_BODIES.clear()
    _NAMES.clear()


def _thoughts_variant(request: chat_pb2.CreateRequest, endpoint: str) -> int:
    if not request.llm_config.put_inner_thoughts_in_kwargs:
        return _NO_THOUGHTS
    first = not request.HasField("put_inner_thoughts_first") or request.put_inner_thoughts_first
    if inner_thoughts.is_lm_studio(endpoint):
        return _FIRST_LM if first else _LAST_LM
    return _FIRST if first else _LAST


def _prompt_function(fn: chat_pb2.FunctionDefinition, index: int, key: bytes, variant: int) -> dict[str, Any]:
    cache_key = (key, variant)
    d = _PROMPT_CACHE.get(cache_key)
    if d is None:
        d = function_to_dict(fn, index)
        if variant != _NO_THOUGHTS:
            d = inner_thoughts.add_inner_thoughts(
                d,
                first=variant in (_FIRST, _FIRST_LM),
                description=(
                    inner_thoughts.INNER_THOUGHTS_DESCRIPTION_GO_FIRST
                    if variant in (_FIRST_LM, _LAST_LM)
                    else inner_thoughts.INNER_THOUGHTS_DESCRIPTION
                ),
            )
        _PROMPT_CACHE.put(cache_key, d, len(key))
    return d


def prompt_functions(
    request: chat_pb2.CreateRequest,
    *,
    endpoint: str | None = None,
    keys: FunctionKeys | None = None,
) -> list[dict[str, Any]]:
    """The functions as the token guard must count them: with inner thoughts, before strict.

    `endpoint` defaults to `llm_config.model_endpoint` (it selects the LM Studio description).
    The list and its dicts are shared, read-only: agents send the same functions every step.
    """
    if endpoint is None:
        endpoint = request.llm_config.model_endpoint
    if keys is None:
        keys = function_keys(request.functions)
    variant = _thoughts_variant(request, endpoint)
    cache_key = (keys, variant)
    found = _PROMPT_LISTS.get(cache_key)
    if found is None:
        pairs = enumerate(zip(request.functions, keys, strict=True))
        prepared = [_prompt_function(fn, i, key, variant) for i, (fn, key) in pairs]
        # Kept, it is shared read-only by every request with these functions: its token count
        # is remembered by identity too (tokens.SharedFunctionList).
        size = list_bytes(keys)
        found = (
            _PROMPT_LISTS.put(cache_key, SharedFunctionList(prepared), size) if cacheable(keys) else prepared
        )
    return found


def _sent_functions(
    functions: Sequence[chat_pb2.FunctionDefinition],
    keys: FunctionKeys,
    variant: int,
    strict: bool,
    tool_shape: bool,
) -> SentFunctions:
    list_key = (keys, variant, strict, tool_shape)
    found = _SENT_LISTS.get(list_key)
    if found is not None:
        return found
    out: list[dict[str, Any]] = []
    restores: dict[str, Restore] = {}
    for i, (fn, key) in enumerate(zip(functions, keys, strict=True)):
        cache_key = (key, variant, strict, tool_shape)
        cached = _SENT_CACHE.get(cache_key)
        if cached is None:
            d = _prompt_function(fn, i, key, variant)
            restore = None
            if strict:
                d, restore = strict_with_restore(d)
            entry = {"type": "function", "function": d} if tool_shape else d
            cached = _SENT_CACHE.put(cache_key, (entry, restore), len(key))
        entry, restore = cached
        out.append(entry)
        if restore is not None:
            restores[fn.name] = restore
    if cacheable(keys):
        shared = SentFunctions(out, restores or None, shared=True)
        return _SENT_LISTS.put(list_key, shared, list_bytes(keys))
    return SentFunctions(out, restores or None)


def _only_forced(sent: SentFunctions, name: str) -> SentFunctions:
    """The forced function alone (for servers that take no named tool_choice), its restore kept."""
    entries = [entry for entry in sent if entry["function"]["name"] == name]
    restores = {name: sent.restores[name]} if sent.restores and name in sent.restores else None
    return SentFunctions(entries, restores)


@dataclass(frozen=True, slots=True)
class _ConfigBody:
    """What the body takes from an LLMConfig sent to one endpoint (the same every step of an
    agent): read once, as each read of a proto field costs more than serializing the config."""

    model: str
    handle: str
    system_role: str  # of system messages (`tools.accepts_developer_role`)
    strict: bool  # tools in strict form (`tools.supports_structured_output`)
    parallel: bool | None  # parallel_tool_calls to send with tools; None: the model takes none
    inner_thoughts: bool  # put_inner_thoughts_in_kwargs
    lm_studio: bool  # with inner thoughts: the endpoint is LM Studio's (their description)
    # max_completion_tokens .. presence_penalty, in body order; None: built from the config each
    # time (a stop list or response_format, whose values are fresh objects per body, or an
    # invalid max_tokens, refused where build_chat_body always refused it).
    tail: tuple[tuple[str, Any], ...] | None
    # The same items as JSON when they hold such fresh objects (a stop list, a response_format:
    # a structured-output schema is commonly 5-50 KB, converted from its Struct in ~0.3 ms per
    # 10 KB every call): decoded into new objects per body (orjson, ~20x faster, the same values:
    # ints within 2**53, floats round-tripped exactly). None: built from the config each time.
    tail_json: bytes | None = None


def _config_body(cfg: chat_pb2.LLMConfig, endpoint: str) -> _ConfigBody:
    model, handle, thoughts = cfg.model, cfg.handle, cfg.put_inner_thoughts_in_kwargs
    tail: tuple[tuple[str, Any], ...] | None = None
    tail_json: bytes | None = None
    if not (cfg.HasField("max_tokens") and cfg.max_tokens <= 0):
        items: dict[str, Any] = {}
        _config_tail(cfg, model, items)
        if not cfg.stop and not cfg.HasField("response_format"):
            tail = tuple(items.items())
        else:
            tail_json = orjson.dumps(items)
    return _ConfigBody(
        model=model,
        handle=handle,
        system_role="developer" if tools.accepts_developer_role(model) else "system",
        strict=tools.supports_structured_output(endpoint),
        parallel=(
            (cfg.parallel_tool_calls if cfg.HasField("parallel_tool_calls") else False)
            if tools.supports_parallel_tool_calls(model)
            else None
        ),
        inner_thoughts=thoughts,
        lm_studio=thoughts and inner_thoughts.is_lm_studio(endpoint),
        tail=tail,
        tail_json=tail_json,
    )


# key (serialized LLMConfig, endpoint) -> its _ConfigBody; keys of at most these sizes are kept
# (a caller's megabyte config or endpoint is read anew every time, never kept; server.core.config_cache).
MAX_CACHED_ENDPOINT_CHARS = 2048
_CONFIG_BODIES: ConfigCache[tuple[bytes, str], _ConfigBody] = ConfigCache()


def config_body(cfg: chat_pb2.LLMConfig, endpoint: str, key: bytes | None = None) -> _ConfigBody:
    """`_config_body`, cached; `key`: `cfg.SerializeToString()` if the caller made it already."""
    if key is None:
        key = cfg.SerializeToString()
    if len(key) > MAX_CACHED_CONFIG_BYTES or len(endpoint) > MAX_CACHED_ENDPOINT_CHARS:
        return _config_body(cfg, endpoint)
    cache_key = (key, endpoint)
    found = _CONFIG_BODIES.get(cache_key)
    if found is None:
        found = _config_body(cfg, endpoint)
        # Kept only if `cfg` still is what `key` says, as in `validation.config_checks`: a pool
        # job of an abandoned routed attempt may read a config the router has since rewritten.
        if cfg.SerializeToString() == key:
            _CONFIG_BODIES.put(cache_key, found, len(key))
    return found


# key function keys -> the functions' names (an agent sends the same list every step)
_NAMES: ConfigCache[FunctionKeys, tuple[str, ...]] = _function_cache(1024)


def _function_names(
    functions: Sequence[chat_pb2.FunctionDefinition], keys: FunctionKeys | None
) -> Sequence[str]:
    if keys is None:
        return [fn.name for fn in functions]
    found = _NAMES.get(keys)  # first: a list found was cacheable when kept (the same bytes now)
    if found is not None:
        return found
    if not cacheable(keys):
        return [fn.name for fn in functions]
    return _NAMES.put(keys, tuple(fn.name for fn in functions), list_bytes(keys))


def build_chat_body(
    request: chat_pb2.CreateRequest,
    *,
    stream: bool,
    endpoint: str,
    keys: FunctionKeys | None = None,
    config_key: bytes | None = None,
    read: Sequence[MessageFields] | None = None,
) -> dict[str, Any]:
    """The exact JSON body for `POST {endpoint}/chat/completions`.

    The `tools`/`functions` list in it is shared and read-only (cached per function set).
    `request` may be any of CreateRequest/StreamCreateRequest/CountTokensRequest (same fields).
    `read`: what `validate_request(request)` returned, if the messages are unchanged since.
    Raises InvalidRequest for invalid messages, functions or tool forcing.
    """
    cfg = request.llm_config
    facts = config_body(cfg, endpoint, config_key)
    model = facts.model
    if not model:
        raise InvalidRequest(
            "llm_config.model must not be empty",
            metadata={"field": "llm_config.model"},
            field_violations=[FieldViolation("llm_config.model", "must not be empty")],
        )
    body: dict[str, Any] = {
        "model": model,
        "messages": to_openai_messages(
            request.messages, model=model, system_role=facts.system_role, read=read
        ),
    }

    functions = request.functions
    names = _function_names(functions, keys)
    choice = tools.resolve_tool_choice(
        function_call=request.function_call,
        force_tool_call=request.force_tool_call,
        function_names=names,
        handle=facts.handle,
        endpoint=endpoint,
        model=model,
    )
    if names:
        use_tool_naming = not request.HasField("use_tool_naming") or request.use_tool_naming
        variant = _variant(request, facts)
        if keys is None:
            keys = function_keys(functions)
        if use_tool_naming:
            sent = _sent_functions(functions, keys, variant, facts.strict, True)
            if isinstance(choice, dict) and not tools.takes_named_tool_choice(
                handle=facts.handle, model=model, endpoint=endpoint
            ):
                sent = _only_forced(sent, choice["function"]["name"])
                choice = "required"
            body["tools"] = sent
            if choice is not None:
                body["tool_choice"] = choice
            if facts.parallel is not None:
                # The caller's choice, else false as the seed sent (one call per step).
                body["parallel_tool_calls"] = facts.parallel
        else:
            # The seed converts only `tools` to strict form; legacy functions go as they are.
            body["functions"] = _sent_functions(functions, keys, variant, False, False)
            legacy = tools.legacy_function_call(choice, names)
            if legacy is not None:
                body["function_call"] = legacy

    if facts.tail is not None:
        body.update(facts.tail)
    elif facts.tail_json is not None:
        body.update(orjson.loads(facts.tail_json))
    else:
        _config_tail(cfg, model, body)
    if request.user_id:
        body["user"] = request.user_id
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _variant(request: chat_pb2.CreateRequest, facts: _ConfigBody) -> int:
    """`_thoughts_variant` with the config's part read from `facts`."""
    if not facts.inner_thoughts:
        return _NO_THOUGHTS
    first = not request.HasField("put_inner_thoughts_first") or request.put_inner_thoughts_first
    if facts.lm_studio:
        return _FIRST_LM if first else _LAST_LM
    return _FIRST if first else _LAST


def _config_tail(cfg: chat_pb2.LLMConfig, model: str, body: dict[str, Any]) -> None:
    """max_completion_tokens, temperature, reasoning_effort and the generation parameters."""
    if cfg.HasField("max_tokens"):
        if cfg.max_tokens <= 0:
            raise InvalidRequest(
                "llm_config.max_tokens must be positive",
                metadata={"field": "llm_config.max_tokens", "max_tokens": cfg.max_tokens},
                field_violations=[FieldViolation("llm_config.max_tokens", "must be positive")],
            )
        body["max_completion_tokens"] = cfg.max_tokens
    if cfg.HasField("temperature"):
        body["temperature"] = cfg.temperature if tools.supports_temperature_param(model) else 1.0
    if cfg.reasoning_effort:
        body["reasoning_effort"] = cfg.reasoning_effort
    generation_parameters(cfg, body)


def generation_parameters(cfg: chat_pb2.LLMConfig, body: dict[str, Any]) -> None:
    """top_p, seed, stop, the penalties and response_format, into `body` as OpenAI names them
    (validated by `server.core.validation`). Each provider's `build_body` drops or renames what
    its API takes differently, and says so in its notes."""
    if cfg.HasField("top_p"):
        body["top_p"] = cfg.top_p
    if cfg.HasField("seed"):
        body["seed"] = cfg.seed
    if cfg.stop:
        body["stop"] = list(cfg.stop)
    if cfg.HasField("frequency_penalty"):
        body["frequency_penalty"] = cfg.frequency_penalty
    if cfg.HasField("presence_penalty"):
        body["presence_penalty"] = cfg.presence_penalty
    if cfg.HasField("response_format"):
        fmt = response_format_json(cfg.response_format)
        if fmt is not None:
            body["response_format"] = fmt


def response_format_json(fmt: chat_pb2.ResponseFormat) -> dict[str, Any] | None:
    """OpenAI's `response_format` object; None for plain text (the default, nothing to send)."""
    if fmt.type in ("", "text"):
        return None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec = fmt.json_schema
    schema: dict[str, Any] = {"name": spec.name}
    if spec.description:
        schema["description"] = spec.description
    schema["schema"] = struct_to_dict(spec.schema)
    if spec.HasField("strict"):
        schema["strict"] = spec.strict
    return {"type": "json_schema", "json_schema": schema}


def unpack_completion(
    body: dict[str, Any], request: chat_pb2.CreateRequest, sent: dict[str, Any] | None = None
) -> None:
    """The answer as the caller's functions mean it, in place: inner thoughts moved from the
    tool-call arguments into the content (when enabled), and, when `sent` (the body built by
    `build_chat_body` for this call) had strict tools that made optional properties nullable,
    the `null` of each such property removed: the tool's own schema meant "absent" there.
    Without `sent` or without such properties nothing is walked.
    """
    if _names_a_file(body.get("model")):
        # llama.cpp's server names its model file ("/models/qwen2.5-7b-q4.gguf"): the caller's
        # model name is kept; the server's stays in the trace (response_json is the raw answer).
        body["model"] = request.llm_config.model
    if request.llm_config.put_inner_thoughts_in_kwargs:
        inner_thoughts.unpack_inner_thoughts(body)
    if sent is not None:
        restores = getattr(sent.get("tools"), "restores", None)
        if restores:
            restore_absent(body, restores)


_MODEL_FILE_SUFFIXES = (".gguf", ".bin", ".safetensors", ".ggml")


def _names_a_file(model: object) -> bool:
    """Whether an answer's `model` is a file path rather than a model name."""
    if not isinstance(model, str):
        return False
    lowered = model.lower()
    return lowered.endswith(_MODEL_FILE_SUFFIXES) or model.startswith(("/", "./", "~")) or "\\" in model
