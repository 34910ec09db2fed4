"""Request validation: every problem found at once, as BadRequest field violations."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core import offload
from server.core.config_cache import MAX_CACHED_CONFIG_BYTES, ConfigCache
from server.errors import FieldViolation, InvalidRequest
from server.providers.local.endpoints import ENDPOINT_TYPES
from server.providers.registry import PROVIDERS

LOCAL_TYPES = frozenset(ENDPOINT_TYPES)
KNOWN_TYPES = frozenset(PROVIDERS) | LOCAL_TYPES

# A single message this large is never a real prompt (about 500k tokens of text); refusing it
# early keeps one request from tying up the tokenizer and memory.
MAX_MESSAGE_CHARS = 2_000_000
MAX_MESSAGES = 10_000
# All text of one request together (messages, parts, tool-call arguments).
MAX_REQUEST_CHARS = 8_000_000
MAX_FUNCTIONS = 1_000
# Thinking blocks of one assistant message (a turn has a few: one per thinking step between tools).
MAX_THINKING_BLOCKS = 1_024
# What a caller puts in its trace (and user_id, kept in the trace's user_id field): ids are short
# (Letta's are a prefix and a UUID, ~45 characters). Unbounded, one request could store a trace
# whose metadata alone is larger than a trace page, or a step_id PostgreSQL cannot index.
MAX_TRACE_ID_CHARS = 256  # trace.step_id, agent_id, run_id, call_type; user_id
MAX_TRACE_TAGS = 256
MAX_TRACE_TAG_CHARS = 256
MAX_MODEL_CHARS = 1024
# handle, provider_name, model_wrapper, reasoning_effort: names, like the model's.
MAX_CONFIG_NAME_CHARS = 1024
MAX_ENDPOINT_CHARS = 8192
# The serialized LLMConfig: every field within its own bound fits in a fraction of this (the
# 256 KiB schema is the biggest); past it, nothing else of the config is read. The config is
# serialized on every call (the caches' key, the trace's copy), so a caller's 50 MB field, or
# unknown field, would otherwise cost the event loop ~100 ms per serialization.
MAX_CONFIG_BYTES = 1024 * 1024
# A TraceContext this small (serialized) is within every bound above (see `_trace_violations`).
_TRACE_BYTES_CHECKED = min(MAX_TRACE_ID_CHARS, MAX_TRACE_TAGS * 2, MAX_TRACE_TAG_CHARS)
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VALID_ROLES = frozenset(chat_pb2.Role.values()) - {chat_pb2.ROLE_UNSPECIFIED}
_ROLE_TOOL, _ROLE_ASSISTANT = chat_pb2.ROLE_TOOL, chat_pb2.ROLE_ASSISTANT


# A message with the fields validation read from it: (message, role, content, parts). The body's
# messages are built from these (`messages.to_openai_messages`'s `read`), not read again: each
# read of a proto field makes a new Python object (~600 instructions for an int, ~1,000-2,000 for
# a string, ~1,700 for a repeated field's container, ~1,800 for the message itself), and they
# were half of converting a message.
MessageFields = tuple[chat_pb2.Message, int, str, Sequence[chat_pb2.ContentPart]]


def _not_kept(fields: MessageFields) -> None:
    """`validate_request`'s `keep` for a request it refuses for its message count."""


def validate_request(
    request: chat_pb2.CreateRequest, keys: FunctionKeys | None = None, config_key: bytes | None = None
) -> list[MessageFields]:
    """Raise InvalidRequest listing every invalid field of a Create/StreamCreate/CountTokens request.

    `keys`: the functions' serialized bytes (`openai_request.function_keys`), if already made;
    `config_key`: `request.llm_config` serialized, if already made (see `config_checks`).
    Returns each message's fields as read here, in order (`MessageFields`), for a caller that
    builds the body of this request, unchanged, next.
    """
    config = config_checks(request.llm_config, config_key)
    violations: list[FieldViolation] = [*config.model, *_trace_violations(request), *config.rest]
    add = violations.append
    messages = request.messages  # each read of a proto field costs: every field is read once
    if not messages:
        add(FieldViolation("messages", "at least one message is required"))
    elif len(messages) > MAX_MESSAGES:
        add(FieldViolation("messages", f"at most {MAX_MESSAGES} messages"))
    total_chars = 0
    read: list[MessageFields] = []
    # Past MAX_MESSAGES the request is refused, its messages still read to name every problem:
    # their fields are not kept (~200 bytes a message; a 64 MiB request holds ~16 million).
    keep = read.append if len(messages) <= MAX_MESSAGES else _not_kept
    for i, message in enumerate(messages):
        role = message.role
        if role not in _VALID_ROLES:
            add(
                FieldViolation(
                    f"messages[{i}].role",
                    "must be one of ROLE_SYSTEM, ROLE_DEVELOPER, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL",
                )
            )
        content = message.content
        parts = message.parts
        keep((message, role, content, parts))
        size = len(content)
        if parts:
            size += sum(len(p.text) + len(p.image_url.url) for p in parts)
        if size > MAX_MESSAGE_CHARS:
            add(FieldViolation(f"messages[{i}].content", f"longer than {MAX_MESSAGE_CHARS} characters"))
        if role == _ROLE_TOOL and not message.tool_call_id:
            add(FieldViolation(f"messages[{i}].tool_call_id", "required for tool messages"))
        # Only an assistant's tool calls are sent (see server.core.messages).
        for j, call in enumerate(message.tool_calls if role == _ROLE_ASSISTANT else ()):
            where = f"messages[{i}].tool_calls[{j}]"
            if not call.name:
                add(FieldViolation(f"{where}.name", "required"))
            size += len(call.arguments) + len(call.thought_signature)
            if not _is_json(call.arguments):
                add(FieldViolation(f"{where}.arguments", "is not valid JSON"))
        # Opaque provider state sent back as it came (Anthropic thinking, Gemini signatures). An
        # empty block is 2 bytes on the wire: the count is bounded before anything iterates them.
        blocks = message.thinking_blocks
        if len(blocks) > MAX_THINKING_BLOCKS:
            add(FieldViolation(f"messages[{i}].thinking_blocks", f"at most {MAX_THINKING_BLOCKS} blocks"))
        elif blocks:
            for block in blocks:
                size += len(block.type) + len(block.text) + len(block.signature) + len(block.data)
        size += len(message.reasoning_content)  # sent back to DeepSeek (server.core.messages)
        total_chars += size
    if total_chars > MAX_REQUEST_CHARS:
        add(FieldViolation("messages", f"more than {MAX_REQUEST_CHARS} characters in all"))
    violations.extend(_function_violations(request.functions, keys))
    if config.inner_thoughts:
        violations.extend(_thought_clashes(request.functions))
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        raise InvalidRequest(
            f"invalid request: {summary}",
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )
    return read


@dataclass(frozen=True, slots=True)
class ConfigChecks:
    """What validation finds in an LLMConfig: its problems (those of `model` come before the
    trace's in the list, as the fields are checked) and whether it asks for inner thoughts."""

    model: tuple[FieldViolation, ...]
    rest: tuple[FieldViolation, ...]
    inner_thoughts: bool


# An agent resends the same config every step (see server.core.config_cache for the bounds).
_CONFIG_CHECKS: ConfigCache[bytes, ConfigChecks] = ConfigCache()


def config_checks(config: chat_pb2.LLMConfig, key: bytes | None = None) -> ConfigChecks:
    """`_check_config`, cached by the config's serialized bytes (each read of a proto field costs
    more than serializing the whole config once).

    `key`: `config.SerializeToString()` if the caller made it already (the request path makes it
    once per call and shares it with the body's and the trace's caches, ~4,000 instructions each).
    """
    if key is None:
        key = config.SerializeToString()
    found = _CONFIG_CHECKS.get(key)
    if found is None:
        if len(key) > MAX_CONFIG_BYTES:
            return ConfigChecks((), (_CONFIG_TOO_LARGE,), False)
        found = _check_config(config)
        # Kept only if `config` still is what `key` says (serialized again, on a miss only): a
        # pool job of an attempt a routed stream abandoned (its deployment's timeout_seconds) may
        # read the config after the router's next attempt rewrote it in place, and must not file
        # that config's checks under its own attempt's key (tests/integration/
        # test_config_key_abandoned.py). Its result is thrown away with its attempt.
        if len(key) <= MAX_CACHED_CONFIG_BYTES and config.SerializeToString() == key:
            _CONFIG_CHECKS.put(key, found, len(key))
    return found


_CONFIG_TOO_LARGE = FieldViolation("llm_config", f"larger than {MAX_CONFIG_BYTES:,} bytes serialized")


def _check_config(config: chat_pb2.LLMConfig) -> ConfigChecks:
    model: list[FieldViolation] = []
    if not config.model:
        model.append(FieldViolation("llm_config.model", "required"))
    elif len(config.model) > MAX_MODEL_CHARS:
        model.append(FieldViolation("llm_config.model", f"longer than {MAX_MODEL_CHARS} characters"))
    violations: list[FieldViolation] = []
    add = violations.append
    endpoint_type = config.model_endpoint_type
    if endpoint_type not in KNOWN_TYPES:
        add(
            FieldViolation(
                "llm_config.model_endpoint_type",
                f"unknown endpoint type {endpoint_type!r}; one of {', '.join(sorted(KNOWN_TYPES))}",
            )
        )
    endpoint = config.model_endpoint
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        add(FieldViolation("llm_config.model_endpoint", f"longer than {MAX_ENDPOINT_CHARS} characters"))
    elif endpoint:
        if not _usable_endpoint(endpoint):
            add(FieldViolation("llm_config.model_endpoint", "must be an http(s) URL"))
    elif endpoint_type in LOCAL_TYPES:
        add(FieldViolation("llm_config.model_endpoint", f"required for {endpoint_type}"))
    for name in ("handle", "provider_name", "model_wrapper", "reasoning_effort"):
        if len(getattr(config, name)) > MAX_CONFIG_NAME_CHARS:
            add(FieldViolation(f"llm_config.{name}", f"longer than {MAX_CONFIG_NAME_CHARS} characters"))
    if config.context_window < 0:
        add(FieldViolation("llm_config.context_window", "must not be negative"))
    if config.HasField("max_tokens") and config.max_tokens < 1:
        add(FieldViolation("llm_config.max_tokens", "must be at least 1"))
    if config.HasField("temperature") and not 0.0 <= config.temperature <= 2.0:
        add(FieldViolation("llm_config.temperature", "must be between 0 and 2"))
    violations.extend(generation_violations(config))
    return ConfigChecks(tuple(model), tuple(violations), config.put_inner_thoughts_in_kwargs)


def _usable_endpoint(url: str) -> bool:
    """An http(s) URL with a host. Cached (up to 1,024 URLs of at most 2,048 characters, so the
    cache stays small whatever callers send): an agent sends the same endpoint every step, and
    parsing it (urlsplit, then its hostname) was a fifth of validating a typical request."""
    return _usable_endpoint_cached(url) if len(url) <= 2048 else _parses_as_endpoint(url)


def _parses_as_endpoint(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. "http://[::1/v1": an unclosed IPv6 literal
        return False


_usable_endpoint_cached = functools.lru_cache(maxsize=1024)(_parses_as_endpoint)


# Stop sequences: OpenAI takes 4, Gemini 5, DeepSeek 16; a provider's own lower cap is its 400.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
# The response_format schema is converted on the event loop on every call (not cached like the
# functions): OpenAI caps a structured-output schema near 120k characters anyway.
MAX_RESPONSE_SCHEMA_BYTES = 256 * 1024
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_SCHEMA_NAME = _FUNCTION_NAME


def _in_range(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high  # NaN fails every comparison anyway


def generation_violations(config: chat_pb2.LLMConfig) -> list[FieldViolation]:
    """top_p, stop, the penalties and response_format of `config` (issue 13, point 8)."""
    found: list[FieldViolation] = []
    add = found.append
    if config.HasField("top_p") and not _in_range(config.top_p, 0.0, 1.0):
        add(FieldViolation("llm_config.top_p", "must be between 0 and 1"))
    for name in ("frequency_penalty", "presence_penalty"):
        if config.HasField(name) and not _in_range(getattr(config, name), -2.0, 2.0):
            add(FieldViolation(f"llm_config.{name}", "must be between -2 and 2"))
    stop = config.stop
    if len(stop) > MAX_STOP_SEQUENCES:  # bounded before anything iterates them
        add(FieldViolation("llm_config.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences"))
    else:
        for i, sequence in enumerate(stop):
            if len(sequence) > MAX_STOP_CHARS:
                add(FieldViolation(f"llm_config.stop[{i}]", f"longer than {MAX_STOP_CHARS} characters"))
            elif not sequence.strip():
                # OpenAI and Anthropic refuse empty and whitespace-only sequences.
                add(FieldViolation(f"llm_config.stop[{i}]", "must contain a non-whitespace character"))
    if config.HasField("response_format"):
        found.extend(_response_format_violations(config.response_format))
    return found


def _response_format_violations(fmt: chat_pb2.ResponseFormat) -> list[FieldViolation]:
    where = "llm_config.response_format"
    kind = fmt.type or "text"
    if kind not in RESPONSE_FORMAT_TYPES:
        return [FieldViolation(f"{where}.type", f"must be one of {', '.join(RESPONSE_FORMAT_TYPES)}")]
    if kind != "json_schema":
        if fmt.HasField("json_schema"):
            return [FieldViolation(f"{where}.json_schema", "only with type json_schema")]
        return []
    spec = fmt.json_schema
    found: list[FieldViolation] = []
    if not _SCHEMA_NAME.match(spec.name):
        found.append(FieldViolation(f"{where}.json_schema.name", "must match ^[A-Za-z0-9_-]{1,64}$"))
    if len(spec.description) > MAX_MESSAGE_CHARS:
        found.append(
            FieldViolation(f"{where}.json_schema.description", f"longer than {MAX_MESSAGE_CHARS} characters")
        )
    if not spec.HasField("schema"):
        found.append(FieldViolation(f"{where}.json_schema.schema", "required for type json_schema"))
    elif spec.schema.ByteSize() > MAX_RESPONSE_SCHEMA_BYTES:
        found.append(
            FieldViolation(f"{where}.json_schema.schema", f"larger than {MAX_RESPONSE_SCHEMA_BYTES} bytes")
        )
    else:
        for path, problem in schema_problems(spec.schema):
            found.append(FieldViolation(f"{where}.json_schema.schema{path}", problem))
    return found


def _trace_violations(request: chat_pb2.CreateRequest) -> list[FieldViolation]:
    trace = request.trace
    # A field's characters are at most its UTF-8 bytes, and each tag takes 2 bytes or more on the
    # wire: a trace of at most MAX_TRACE_ID_CHARS bytes (every real one: ids of ~45 characters)
    # has no id, tag or tag count over its bound, and its strings need not be decoded to know it.
    if trace.ByteSize() <= _TRACE_BYTES_CHECKED and len(request.user_id) <= MAX_TRACE_ID_CHARS:
        return []
    found: list[FieldViolation] = []
    for name, value in (
        ("trace.step_id", trace.step_id),
        ("trace.agent_id", trace.agent_id),
        ("trace.run_id", trace.run_id),
        ("trace.call_type", trace.call_type),
        ("user_id", request.user_id),
    ):
        if len(value) > MAX_TRACE_ID_CHARS:
            found.append(FieldViolation(name, f"longer than {MAX_TRACE_ID_CHARS} characters"))
    if len(trace.tags) > MAX_TRACE_TAGS:
        found.append(FieldViolation("trace.tags", f"at most {MAX_TRACE_TAGS} tags"))
    else:
        for i, tag in enumerate(trace.tags):
            if len(tag) > MAX_TRACE_TAG_CHARS:
                found.append(
                    FieldViolation(f"trace.tags[{i}]", f"longer than {MAX_TRACE_TAG_CHARS} characters")
                )
                break
    return found


FunctionKeys = tuple[bytes, ...]
# A function list is cached whole only up to this many bytes (a request may carry megabytes of
# schemas; a larger one is prepared every time).
MAX_CACHED_LIST_BYTES = 256 * 1024
# Every cache keyed by functions' bytes (a caller chooses them) is bounded in the key bytes it
# holds, not only in entries: counted alone, distinct ~1 MiB functions (a parameters Struct may
# be up to 1 MiB) pinned 2,048 keys of 1 MiB and what was derived from them in each cache, GBs
# from a few 64 MiB requests. A function or list past MAX_CACHED_FUNCTION_BYTES is worked out
# anew on every request that carries it, as huge sets already were (in the offload pool).
MAX_CACHED_FUNCTION_BYTES = MAX_CACHED_LIST_BYTES
# Key bytes per cache: what a cache pins is ~12x its keys (converted dicts; measured: 190 KB
# functions, 3.8 MB of keys, 46 MB held), so ~50 MB a cache at most; ~2,000 tools of 2 KB.
MAX_HELD_FUNCTION_BYTES = 4 * 1024 * 1024


def function_keys(functions: Sequence[chat_pb2.FunctionDefinition]) -> FunctionKeys:
    """Each function's serialized bytes: the cache key of everything derived from it.

    Compute it once per request and pass it to `validate_request`, `build_chat_body` and
    `prompt_functions` (each computes it itself when not given).
    """
    return tuple(fn.SerializeToString() for fn in functions)


def _serialized(function: chat_pb2.FunctionDefinition) -> bytes:
    return function.SerializeToString()


def function_keys_started(functions: Sequence[chat_pb2.FunctionDefinition]) -> list[bytes]:
    """The keys serialized on the loop: all of them for a normal set, the first ones up to
    `OFFLOAD_FUNCTION_BYTES` (and one function more) for a huge one (`function_keys_rest`
    serializes the others in the pool). A plain call: a normal request awaits nothing."""
    keys: list[bytes] = []
    held = 0
    for function in functions:
        if held > OFFLOAD_FUNCTION_BYTES:
            break
        key = _serialized(function)
        keys.append(key)
        held += len(key)
    return keys


async def function_keys_rest(
    functions: Sequence[chat_pb2.FunctionDefinition], started: list[bytes]
) -> FunctionKeys:
    """All the keys, given `function_keys_started`'s: the rest serialized in the offload pool."""
    if len(started) < len(functions):
        rest = functions[len(started) :]
        started = [*started, *await offload.run(lambda: [_serialized(fn) for fn in rest])]
    return tuple(started)


async def function_keys_async(functions: Sequence[chat_pb2.FunctionDefinition]) -> FunctionKeys:
    """`function_keys` (the request path's): serialized on the loop until the set passes
    `OFFLOAD_FUNCTION_BYTES`, the rest in the offload pool (~50 ms per 10 MB, every request)."""
    return await function_keys_rest(functions, function_keys_started(functions))


# A function set larger than this (serialized) is validated, converted, rendered and counted in
# `server.core.offload`'s pool: a 10 MB set (1,000 functions of 30 properties with 20-option
# enums) costs seconds of pure Python on its first request. A normal agent's tools (tens of KB)
# stay on the loop and pay no thread hop.
OFFLOAD_FUNCTION_BYTES = 64 * 1024


def off_loop(keys: FunctionKeys) -> bool:
    """Whether the function work of a request with these functions runs off the event loop."""
    return sum(map(len, keys)) > OFFLOAD_FUNCTION_BYTES


# What a cached list pins per function beyond its key bytes (its prepared dicts, with inner
# thoughts and in strict form, its name, its problems): counted by key bytes alone, a list of tiny
# functions held ~400x its size. 1,000 functions of 3-character names are ~5 KB of keys and ~2 MB
# of prepared dicts (measured), so 1,024 such lists pinned ~2 GB under a 16 MiB bound of keys
# never reached; and 2-byte empty functions (refused, but their problems kept) counted nothing.
LIST_BYTES_PER_FUNCTION = 512


def list_bytes(keys: FunctionKeys) -> int:
    """The size a cache of whole function lists counts for `keys`."""
    return sum(map(len, keys)) + LIST_BYTES_PER_FUNCTION * len(keys)


def cacheable(keys: FunctionKeys) -> bool:
    """Whether a whole function list is small enough to be cached under `keys`."""
    return list_bytes(keys) <= MAX_CACHED_LIST_BYTES


# Problems of a whole function list, by its functions' bytes: agents send the same list each step.
_FUNCTION_PROBLEMS: ConfigCache[FunctionKeys, tuple[FieldViolation, ...]] = ConfigCache(
    2048, MAX_HELD_FUNCTION_BYTES, MAX_CACHED_FUNCTION_BYTES
)


def _function_violations(
    functions: Sequence[chat_pb2.FunctionDefinition], keys: FunctionKeys | None
) -> tuple[FieldViolation, ...]:
    if keys is None:
        keys = function_keys(functions)
    found = _FUNCTION_PROBLEMS.get(keys)
    if found is not None:
        return found
    violations: list[FieldViolation] = []
    add = violations.append
    if len(functions) > MAX_FUNCTIONS:
        add(FieldViolation("functions", f"at most {MAX_FUNCTIONS} functions"))
    names = set()
    for i, function in enumerate(functions):
        if not _FUNCTION_NAME.match(function.name):
            add(FieldViolation(f"functions[{i}].name", "must match ^[A-Za-z0-9_-]{1,64}$"))
        elif function.name in names:
            add(FieldViolation(f"functions[{i}].name", f"duplicate function {function.name!r}"))
        names.add(function.name)
        if function.HasField("parameters"):
            for where, problem in schema_problems(function.parameters):
                # The name too: a path alone does not say which of many tools to fix.
                add(
                    FieldViolation(
                        f"functions[{i}].parameters{where}", f"{problem} (function {function.name!r})"
                    )
                )
    return _FUNCTION_PROBLEMS.put(keys, tuple(violations), list_bytes(keys))


# The argument names inner thoughts travel in (server.core.inner_thoughts; not imported, to
# keep validation free of the request-building modules).
_THOUGHT_ARGUMENTS = ("thinking", "inner_thoughts")


def _thought_clashes(functions: Sequence[chat_pb2.FunctionDefinition]) -> list[FieldViolation]:
    """A function argument that put_inner_thoughts_in_kwargs would silently take over.

    The injected `thinking` replaces a property of that name, and unpacking pops `thinking` and
    `inner_thoughts` from every answer: the tool would never receive its own argument.
    """
    out: list[FieldViolation] = []
    for i, function in enumerate(functions):
        if not function.HasField("parameters"):
            continue
        properties = function.parameters.fields.get("properties")
        if properties is None or properties.WhichOneof("kind") != "struct_value":
            continue
        for name in _THOUGHT_ARGUMENTS:
            if name in properties.struct_value.fields:
                out.append(
                    FieldViolation(
                        f"functions[{i}].parameters.properties.{name}",
                        f"function {function.name!r} has an argument {name!r}, which "
                        "put_inner_thoughts_in_kwargs uses for the inner thoughts; rename it",
                    )
                )
    return out


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


# -- function parameter schemas ------------------------------------------------------------------

_SCHEMA_CACHE: ConfigCache[bytes, tuple[tuple[str, str], ...]] = ConfigCache(
    2048, MAX_HELD_FUNCTION_BYTES, MAX_CACHED_FUNCTION_BYTES
)
_MAX_SCHEMA_PROBLEMS = 10


def schema_problems(parameters: struct_pb2.Struct) -> tuple[tuple[str, str], ...]:
    """(path, problem) for the JSON-Schema keywords that must have a fixed shape.

    Wherever they appear, `properties` must be an object and `required` a list of strings (as
    JSON Schema says); the request path relies on both. No number may be NaN or infinite: a
    Struct carries them, JSON cannot, and the body serializer would send `null` in their place
    (a `maximum: Infinity` silently becoming `maximum: null` is a different schema). Cached by
    the schema's bytes: agents send the same functions on every step.
    """
    # Not `deterministic=True` (slower): an unstable key costs a cache miss, never a wrong answer.
    key = parameters.SerializeToString()
    found = _SCHEMA_CACHE.get(key)
    if found is None:
        problems: list[tuple[str, str]] = []
        _walk_schema(parameters, "", problems)
        found = _SCHEMA_CACHE.put(key, tuple(problems[:_MAX_SCHEMA_PROBLEMS]), len(key))
    return found


def _walk_schema(struct: struct_pb2.Struct, path: str, problems: list[tuple[str, str]]) -> None:
    fields = struct.fields
    if "properties" in fields and fields["properties"].WhichOneof("kind") != "struct_value":
        problems.append((f"{path}.properties", "must be an object"))
    if "required" in fields:
        required = fields["required"]
        if required.WhichOneof("kind") != "list_value" or any(
            v.WhichOneof("kind") != "string_value" for v in required.list_value.values
        ):
            problems.append((f"{path}.required", "must be a list of strings"))
    for name, value in fields.items():
        where = f"{path}.{name}"
        if name in _SCHEMA_MAPS and value.WhichOneof("kind") == "struct_value":
            # Names -> schemas: a property may be called "required" or "properties".
            for key, schema in value.struct_value.fields.items():
                _walk_value(schema, f"{where}.{key}", problems, schema=True)
        else:
            _walk_value(value, where, problems, schema=name not in _DATA_KEYWORDS)


# Keywords whose value maps names to schemas, and keywords whose value is data (an instance,
# never a schema: an enum member may be any object). Both are still scanned for NaN/Infinity.
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})


def _walk_value(
    value: struct_pb2.Value, path: str, problems: list[tuple[str, str]], *, schema: bool = True
) -> None:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        if schema:
            _walk_schema(value.struct_value, path, problems)
        else:
            for key, item in value.struct_value.fields.items():
                _walk_value(item, f"{path}.{key}", problems, schema=False)
    elif kind == "list_value":
        for j, item in enumerate(value.list_value.values):
            _walk_value(item, f"{path}[{j}]", problems, schema=schema)
    elif kind == "number_value" and not math.isfinite(value.number_value):
        problems.append((path, f"is {value.number_value}: not a finite number, which JSON cannot carry"))


# -- request bytes that do not decode ------------------------------------------------------------

# upb (the protobuf runtime) refuses messages nested deeper than 100 levels
# (kUpb_WireFormat_DefaultDepthLimit; Python offers no way to raise it). In a chat request only a
# function's `parameters` (google.protobuf.Struct) can nest: CreateRequest and FunctionDefinition
# are 2 levels, the parameters Struct 1, and each JSON object inside adds 3 (map entry, Value,
# Struct), so at most 33 nested JSON objects decode, the parameters object included: 16 levels
# of `properties` (measured in tests/integration/test_hardening_semantics.py).
MAX_MESSAGE_DEPTH = 100
MAX_SCHEMA_OBJECT_DEPTH = 33
_DEPTH_ERROR = ("maxdepth", "depth", "recursion", "nesting")


def undecodable(name: str, data: bytes, exc: BaseException) -> InvalidRequest:
    """The INVALID_REQUEST for request bytes of message type `name` that do not decode.

    A nesting past the decode limit is named as such (with the limits): "not a valid
    CreateRequest" alone sends the caller looking for corrupt bytes in a well-formed request.
    """
    metadata: dict[str, object] = {"message_type": name, "bytes": len(data)}
    if any(word in str(exc).lower() for word in _DEPTH_ERROR):
        metadata["max_message_depth"] = MAX_MESSAGE_DEPTH
        if name == chat_pb2.CreateRequest.DESCRIPTOR.full_name:
            metadata["max_schema_object_depth"] = MAX_SCHEMA_OBJECT_DEPTH
            description = (
                f"a function schema nests deeper than protobuf can decode: at most "
                f"{MAX_SCHEMA_OBJECT_DEPTH} nested JSON objects (16 levels of properties), "
                f"{MAX_MESSAGE_DEPTH} message levels in all"
            )
            field = "functions[].parameters"
        else:
            description = f"the request nests messages deeper than protobuf's limit of {MAX_MESSAGE_DEPTH}"
            field = ""
        return InvalidRequest(
            f"the request is not a valid {name}: {description}",
            metadata=metadata,
            field_violations=[FieldViolation(field, description)],
        )
    return InvalidRequest(
        f"the request is not a valid {name}",
        metadata=metadata,
        field_violations=[FieldViolation("", f"the request bytes do not decode as {name}")],
    )
