"""Google AI (Gemini API) translator: OpenAI Chat Completions JSON to `generateContent` and back.

Pure logic plus constants (no I/O), per /work/notes/provider-spec.md: the gateway's HTTP client,
retry loop, SSE reader and trace code call these functions. Nothing here imports
`server.gateway`.

Requests (`build_body`), where the spec leaves a choice:
- system and developer messages, wherever they stand, become `systemInstruction` parts in
  order (Gemini has one system instruction, not system turns).
- `contents` strictly alternates `user`/`model`: adjacent turns of the same role are merged
  (tool results follow the assistant turn as one user turn of `functionResponse` parts). The
  function name of a result is that of the latest assistant tool call with its id (ids may
  repeat across turns: ours are per answer); a result whose id matches none is INVALID_ARGUMENT.
  `response` must be an object: a JSON object result is sent as it is, anything else as
  `{"result": value}` (text that is not JSON as a string).
- Tool call ids are never sent back (`functionCall.id` is optional; Gemini pairs calls and
  responses by order and name), so ids from any provider work in the history.
- Images: data URLs become `inlineData`; `https://` URLs become `fileData` (Gemini fetches
  public and signed HTTPS URLs since January 2026, and Files API URIs are HTTPS too) with the
  MIME type guessed from the path (`image/jpeg` when the path says nothing). Plain `http://`
  and other schemes are INVALID_ARGUMENT: Gemini does not fetch them.
- Tool schemas are converted to Gemini's OpenAPI-subset `Schema` (`_SchemaConverter`). A
  keyword it cannot express is INVALID_ARGUMENT naming the keyword and its path, never a
  silent drop that would let the model produce what the tool refuses, nor an upstream 400.
  Local `$ref`s into the root `$defs`/`definitions` are inlined (not recursive ones).
- `tool_choice`: `required` -> mode ANY, a named function -> ANY + `allowedFunctionNames`,
  `auto` -> AUTO, `none` -> NONE. Legacy `functions`/`function_call` are read the same way.
- `reasoning_effort`: Gemini 3 and later take `thinkingLevel` (MINIMAL/LOW/MEDIUM/HIGH, the same
  word); older models `thinkingBudget`: minimal 512 (the smallest budget every 2.5 model
  accepts), low 1024, medium 8192, high 24576 (the 2.5 Flash maximum), none 0. Either way
  `includeThoughts: true`, so the thought summary comes back as `reasoning_content`.
- `response_format` json_object -> `responseMimeType: application/json`; json_schema -> also
  `responseSchema`, converted like tool parameters (so it works on every model).
- Dropped (returned by `build_body_with_notes`): `user`, `parallel_tool_calls` (Gemini has no
  such switch), `stream_options` (Gemini always reports usage), and any other key it has no
  field for. `model` and `stream` are in the URL, so they are not "dropped".

Thought signatures (Gemini's opaque reasoning state, required back on function-call parts):
- the signature of a `functionCall` part rides on its OpenAI tool call dict as
  `"thought_signature"` and is put back on that `functionCall` part next turn;
- a signature on a text part (optional to return, per Google) rides in the message's
  `thinking_blocks` as `{"type": "gemini_thought_signature", "signature": ...}` and is put back on
  the last text part of that model turn. Other providers' thinking blocks are ignored.

Answers: thought parts (`thought: true`) are `reasoning_content`; `functionCall` parts are
tool calls with Gemini's `id` when it sends one, else `call_<index>`; finishReason STOP ->
stop (tool_calls when there are calls), MAX_TOKENS -> length, the safety family ->
content_filter (with `refusal` saying why), a blocked prompt (no candidates, promptFeedback
blockReason) -> content_filter, never an empty stop; MALFORMED_FUNCTION_CALL and kin ->
UNPARSEABLE_MODEL_OUTPUT. Usage: prompt_tokens = promptTokenCount (which includes
cachedContentTokenCount) + toolUsePromptTokenCount; completion_tokens = candidatesTokenCount +
thoughtsTokenCount (OpenAI's completion_tokens includes reasoning); cached_tokens and
reasoning_tokens from the matching counts.
"""

from __future__ import annotations

import mimetypes
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from server.core.reasoning_only import REASONING_ONLY
from server.core.retry import RetryableError, parse_retry_after
from server.errors import (
    ContextWindowExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RateLimitExceeded,
    UnparseableModelOutput,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.providers.errors import error_in_body, http_code, upstream_message

NAME = "google_ai"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"

THOUGHT_SIGNATURE_BLOCK = "gemini_thought_signature"
_CALL_ID_PREFIX = "call_"


# --------------------------------------------------------------------------------------------
# Endpoint and auth


def endpoint_url(base_url: str, model: str, *, stream: bool) -> str:
    """`{base}/models/{model}:generateContent` (or the SSE stream); the key is never in the URL."""
    name = model.removeprefix("models/")
    # safe="": a "/" or "?" in a model name must not reach another path or a query.
    quoted = urllib.parse.quote(name, safe="")
    if stream:
        return f"{base_url}/models/{quoted}:streamGenerateContent?alt=sse"
    return f"{base_url}/models/{quoted}:generateContent"


def auth_headers(api_key: str) -> dict[str, str]:
    return {"x-goog-api-key": api_key}


# --------------------------------------------------------------------------------------------
# Request body


def _invalid(field: str, description: str, **metadata: object) -> InvalidRequest:
    return InvalidRequest(
        f"{field} {description} (provider {NAME})",
        metadata={"provider": NAME, "field": field, **metadata},
        field_violations=[FieldViolation(field, description)],
    )


def build_body(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The `generateContent` body for an OpenAI-shaped chat body (see the module docstring)."""
    return build_body_with_notes(body, stream=stream)[0]


# Keys the translation reads; `model` and `stream` are carried by the URL instead.
_CONSUMED = frozenset(
    {
        "model",
        "stream",
        "messages",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "reasoning_effort",
    }
)


def build_body_with_notes(body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
    """As `build_body`, plus the names of the request's parameters Gemini has no field for.

    `stream` does not change the body (the stream is chosen by the URL); it is taken so every
    translator has the same signature.
    """
    del stream
    system, contents = _contents(body.get("messages") or [])
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    # One inlining budget for every schema of the request (functions and the response schema).
    budget = [0]
    declarations = _declarations(body, budget)
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
        tool_config = _tool_config(body)
        if tool_config is not None:
            out["toolConfig"] = tool_config
    out["generationConfig"] = _generation_config(body, budget)
    dropped = sorted(key for key in body if key not in _CONSUMED)
    return out, dropped


# ---- messages


@dataclass(slots=True)
class _Turns:
    """`contents` being built: adjacent parts of the same role are merged into one turn."""

    contents: list[dict[str, Any]]

    def add(self, role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if self.contents and self.contents[-1]["role"] == role:
            self.contents[-1]["parts"].extend(parts)
        else:
            self.contents.append({"role": role, "parts": parts})


def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns = _Turns([])
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), f"messages[{i}].content"))
        elif role == "user":
            turns.add("user", _user_parts(message.get("content"), i))
        elif role == "assistant":
            turns.add("model", _model_parts(message, i, call_names))
        elif role in ("tool", "function"):
            turns.add("user", [_function_response(message, i, call_names)])
        else:
            raise _invalid(f"messages[{i}].role", "is not a role Gemini can take", role=role)
    return system, turns.contents


def _text_parts(content: object, field: str) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid(f"{field}[{k}]", "must be a text part here")
            if part.get("text"):
                parts.append({"text": part["text"]})
        return parts
    raise _invalid(field, "must be a string or a list of content parts")


def _user_parts(content: object, i: int) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_parts(content, f"messages[{i}].content")
    parts: list[dict[str, Any]] = []
    for k, part in enumerate(content):
        field = f"messages[{i}].content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_image_part(part.get("image_url"), f"{field}.image_url.url"))
        else:
            raise _invalid(field, "is a content part Gemini cannot take", part_type=kind)
    return parts


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,]*)?;base64,(?P<data>.*)", re.DOTALL)


def _image_part(image: object, field: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _invalid(field, "must be a data: or https: URL")
    match = _DATA_URL.fullmatch(url)
    if match is not None:
        return {"inlineData": {"mimeType": match["mime"], "data": match["data"]}}
    if url.startswith("data:"):
        raise _invalid(field, "is a data URL that is not base64 with a MIME type")
    if not url.lower().startswith("https://"):
        scheme = url.split(":", 1)[0][:20]
        raise _invalid(field, "must be a data: or https: URL (Gemini fetches only HTTPS)", scheme=scheme)
    path = urllib.parse.urlsplit(url).path
    mime = mimetypes.guess_type(path, strict=False)[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _model_parts(message: dict[str, Any], i: int, call_names: dict[str, str]) -> list[dict[str, Any]]:
    parts = _text_parts(message.get("content"), f"messages[{i}].content")
    signature = _text_signature(message.get("thinking_blocks"))
    if signature is not None and parts:
        parts[-1]["thoughtSignature"] = signature
    for j, call in enumerate(message.get("tool_calls") or []):
        parts.append(_function_call(call, f"messages[{i}].tool_calls[{j}]", call_names))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        parts.append(_function_call({"function": legacy}, f"messages[{i}].function_call", call_names))
    return parts


def _text_signature(blocks: object) -> str | None:
    """The last Gemini text-part signature among a message's thinking blocks."""
    signature = None
    for block in blocks if isinstance(blocks, list) else ():
        if isinstance(block, dict) and block.get("type") == THOUGHT_SIGNATURE_BLOCK:
            signature = block.get("signature") or signature
    return signature


def _function_call(call: dict[str, Any], field: str, call_names: dict[str, str]) -> dict[str, Any]:
    function = call.get("function") or {}
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{field}.function.name", "must not be empty")
    args = _json_object_or_none(function.get("arguments"))
    if args is None:
        raise _invalid(f"{field}.function.arguments", "must be a JSON object (Gemini's args)")
    if call.get("id"):
        call_names[call["id"]] = name
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if call.get("thought_signature"):
        part["thoughtSignature"] = call["thought_signature"]
    return part


def _json_object_or_none(arguments: object) -> dict[str, Any] | None:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str | bytes) else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _function_response(message: dict[str, Any], i: int, call_names: dict[str, str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    name = call_names.get(call_id) if isinstance(call_id, str) else None
    name = name or message.get("name")
    if not name:
        raise _invalid(
            f"messages[{i}].tool_call_id",
            "matches no earlier assistant tool call (Gemini needs the function's name)",
            tool_call_id=call_id,
        )
    return {"functionResponse": {"name": name, "response": _response_object(message.get("content"))}}


def _response_object(content: object) -> dict[str, Any]:
    if isinstance(content, list):  # text parts, as OpenAI allows for tool results
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    if isinstance(content, str):
        try:
            value: Any = orjson.loads(content)
        except orjson.JSONDecodeError:
            value = content
    else:
        value = content
    return value if isinstance(value, dict) else {"result": value}


# ---- tools


def _declarations(body: dict[str, Any], budget: list[int]) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for k, tool in enumerate(body.get("tools") or []):
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if kind != "function":
            raise _invalid(f"tools[{k}]", "is not a function tool", tool_type=str(kind))
        declarations.append(_declaration(tool.get("function") or {}, f"tools[{k}].function", budget))
    for k, function in enumerate(body.get("functions") or []):
        declarations.append(_declaration(function, f"functions[{k}]", budget))
    return declarations


def _declaration(function: dict[str, Any], field: str, budget: list[int]) -> dict[str, Any]:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{field}.name", "must not be empty")
    out: dict[str, Any] = {"name": name}
    if function.get("description"):
        out["description"] = function["description"]
    parameters = function.get("parameters")
    # A function without arguments has no `parameters`: Gemini refuses an OBJECT without
    # properties.
    if isinstance(parameters, dict) and parameters.get("properties"):
        out["parameters"] = convert_schema(parameters, f"{field}.parameters", budget)
    return out


def _tool_config(body: dict[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is None:
        return None
    config: dict[str, Any]
    if choice == "auto":
        config = {"mode": "AUTO"}
    elif choice == "required":
        config = {"mode": "ANY"}
    elif choice == "none":
        config = {"mode": "NONE"}
    elif isinstance(choice, dict) and _forced_name(choice):
        config = {"mode": "ANY", "allowedFunctionNames": [_forced_name(choice)]}
    else:
        raise _invalid("tool_choice", "must be auto, required, none or a named function")
    return {"functionCallingConfig": config}


def _forced_name(choice: dict[str, Any]) -> str | None:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else choice.get("name")
    return name if isinstance(name, str) and name else None


# ---- schemas

# JSON Schema keywords Gemini's Schema takes under the same name and meaning.
_SCALAR_KEYWORDS = frozenset(
    {
        "description",
        "title",
        "default",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minProperties",
        "maxProperties",
        "propertyOrdering",
        "nullable",
    }
)
# Annotations: they constrain nothing, so dropping them changes no answer.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "examples", "example", "deprecated", "readOnly", "writeOnly"}
)
# Read by the converter itself.
_STRUCTURAL = frozenset(
    {"type", "properties", "required", "items", "anyOf", "enum", "const", "format", "$ref"}
    | {"additionalProperties", "$defs", "definitions"}
)
_TYPES = {
    "string": "STRING",
    "number": "NUMBER",
    "integer": "INTEGER",
    "boolean": "BOOLEAN",
    "array": "ARRAY",
    "object": "OBJECT",
}
# Formats Gemini acts on; others are annotations in JSON Schema (2020-12 makes `format`
# annotation-only by default) and the Gemini API rejects some of them, so they are dropped.
_FORMATS = {"STRING": {"enum", "date-time"}, "NUMBER": {"float", "double"}, "INTEGER": {"int32", "int64"}}
_MAX_DEPTH = 64
# Schema nodes one converted schema may have, $refs inlined (a large real tool has hundreds).
MAX_SCHEMA_NODES = 20_000
# Nodes one request's schemas may gain by inlining $refs, all schemas together: the bound above
# alone let 60 small functions each expand to just under it (1,000,000 nodes, 9 s on the loop,
# a 60 MB body from 70 KB). Nodes written out in the request itself are bounded by its size.
MAX_INLINED_NODES = 20_000


def convert_schema(schema: dict[str, Any], field: str, budget: list[int] | None = None) -> dict[str, Any]:
    """A JSON Schema (OpenAI function parameters or response schema) as Gemini's `Schema`.

    Raises InvalidRequest naming the keyword and its JSON path when Gemini cannot express it.
    `budget` counts the nodes inlined from $refs across the schemas of one request.
    """
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs.update({f"#/{key}/{name}": value for name, value in schema[key].items()})
    return _SchemaConverter(field, defs, [0], [0] if budget is None else budget).node(schema, "", ())


@dataclass(frozen=True, slots=True)
class _SchemaConverter:
    field: str
    defs: dict[str, Any]
    # Nodes emitted so far: inlining $refs can grow a small schema exponentially (a definition
    # using the next one twice, 30 deep, is 2**30 nodes), which would pin the event loop.
    emitted: list[int]
    inlined: list[int]  # nodes emitted beneath a $ref, shared by the request's schemas

    def refuse(self, path: str, keyword: str, why: str) -> InvalidRequest:
        where = path or "/"
        return InvalidRequest(
            f"{self.field}: schema keyword {keyword!r} at {where} {why} (provider {NAME})",
            metadata={"provider": NAME, "field": self.field, "keyword": keyword, "schema_path": where},
            field_violations=[FieldViolation(f"{self.field}{path.replace('/', '.')}", f"{keyword}: {why}")],
        )

    def node(self, schema: object, path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(schema, dict):
            raise self.refuse(path, "schema", "must be an object")
        if len(refs) > _MAX_DEPTH or path.count("/") > _MAX_DEPTH:
            raise self.refuse(path, "schema", "nests too deep")
        self.emitted[0] += 1
        if self.emitted[0] > MAX_SCHEMA_NODES:
            raise self.refuse(path, "$ref", f"expands the schema past {MAX_SCHEMA_NODES} nodes once inlined")
        if refs:
            self.inlined[0] += 1
            if self.inlined[0] > MAX_INLINED_NODES:
                raise self.refuse(
                    path, "$ref", f"inlines more than {MAX_INLINED_NODES} nodes in one request's schemas"
                )
        if "$ref" in schema:
            return self.ref(schema, path, refs)
        for keyword in schema:
            if keyword not in _SCALAR_KEYWORDS and keyword not in _ANNOTATIONS and keyword not in _STRUCTURAL:
                raise self.refuse(path, keyword, "has no equivalent in Gemini's schema")
        kinds, nullable = self.kinds(schema, path)
        if len(kinds) > 1:
            # ["string", "number"]: one option per type, each with the constraints of its kind.
            options = [self.node({**schema, "type": kind}, path, refs) for kind in kinds]
            return self.union(schema, options, nullable)
        if "anyOf" in schema:
            return self.any_of(schema, path, refs)
        out = {k: v for k, v in schema.items() if k in _SCALAR_KEYWORDS}
        if kinds:
            out["type"] = _TYPES[kinds[0]]
        elif nullable:
            out["type"] = "NULL"
        nullable = self.enum(schema, path, out) or (nullable and bool(kinds))
        if nullable:
            out["nullable"] = True
        self.format(schema, out)
        if out.get("type") == "OBJECT":
            self.object(schema, path, out, refs)
        elif out.get("type") == "ARRAY":
            out["items"] = self.node(schema.get("items"), f"{path}/items", refs)
        return out

    def ref(self, schema: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        ref = schema["$ref"]
        if ref not in self.defs:
            raise self.refuse(path, "$ref", "must point into the root $defs (Gemini has no $ref)")
        if ref in refs:
            raise self.refuse(path, "$ref", "is recursive, which Gemini cannot express")
        # Siblings of a $ref (description, title, default) say what this use of the definition
        # means, so they win over the definition's own.
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        return self.node({**self.defs[ref], **siblings}, path, (*refs, ref))

    def kinds(self, schema: dict[str, Any], path: str) -> tuple[list[str], bool]:
        """The schema's non-null JSON types, and whether null is allowed by `type`."""
        declared = schema.get("type")
        if declared is None:
            # No type means any; the keywords present say which kind the caller meant.
            if "properties" in schema:
                return ["object"], False
            return (["array"], False) if "items" in schema else ([], False)
        names = declared if isinstance(declared, list) else [declared]
        for name in names:
            if name != "null" and name not in _TYPES:
                raise self.refuse(f"{path}/type", "type", f"{name!r} is not a Gemini type")
        return [name for name in names if name != "null"], "null" in names

    def any_of(self, schema: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise self.refuse(path, "anyOf", "must be a non-empty list")
        if "type" in schema or "enum" in schema or "const" in schema:
            raise self.refuse(path, "anyOf", "beside type or enum is ambiguous for Gemini")
        converted = [
            self.node(option, f"{path}/anyOf/{k}", refs)
            for k, option in enumerate(options)
            if option != {"type": "null"}
        ]
        return self.union(schema, converted, len(converted) < len(options))

    def union(self, schema: dict[str, Any], options: list[dict[str, Any]], nullable: bool) -> dict[str, Any]:
        out = {k: v for k, v in schema.items() if k in ("description", "title", "default")}
        if len(options) == 1:
            out = {**options[0], **out}  # anyOf [X, null]: X, nullable
        elif options:
            out["anyOf"] = options
        if nullable:
            out["nullable"] = True
        return out

    def enum(self, schema: dict[str, Any], path: str, out: dict[str, Any]) -> bool:
        """Sets `enum` (strings only, as Gemini takes them); True when null was one of the values."""
        keyword = "const" if "const" in schema else "enum"
        if keyword not in schema:
            return False
        values = [schema["const"]] if keyword == "const" else schema["enum"]
        if not isinstance(values, list):
            raise self.refuse(path, keyword, "must be a list")
        kept = [value for value in values if value is not None]
        if not all(isinstance(value, str) for value in kept):
            raise self.refuse(path, keyword, "has non-string values; Gemini enums are strings only")
        out["enum"] = kept
        out.setdefault("type", "STRING")
        return len(kept) < len(values)

    def format(self, schema: dict[str, Any], out: dict[str, Any]) -> None:
        fmt = schema.get("format")
        if fmt in _FORMATS.get(out.get("type", ""), ()):
            out["format"] = fmt

    def object(self, schema: dict[str, Any], path: str, out: dict[str, Any], refs: tuple[str, ...]) -> None:
        extra = schema.get("additionalProperties", False)
        if extra is not False:
            # A map (any key, or keys of a schema): Gemini objects have fixed properties only.
            raise self.refuse(path, "additionalProperties", "must be false or absent for Gemini")
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise self.refuse(path, "properties", "must name at least one property for a Gemini object")
        out["properties"] = {
            name: self.node(value, f"{path}/properties/{name}", refs) for name, value in properties.items()
        }
        if isinstance(schema.get("required"), list):
            out["required"] = list(schema["required"])
        # Gemini otherwise orders keys as it likes; the caller's order carries meaning (the
        # gateway puts inner thoughts first so the model reasons before it acts).
        if len(properties) > 1:
            out.setdefault("propertyOrdering", list(properties))


# ---- generation parameters

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_THINKING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_GEMINI_MAJOR = re.compile(r"gemini-(\d+)")


def _generation_config(body: dict[str, Any], budget: list[int]) -> dict[str, Any]:
    config: dict[str, Any] = {"candidateCount": 1}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    for source, target in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("frequency_penalty", "frequencyPenalty"),
        ("presence_penalty", "presencePenalty"),
    ):
        if body.get(source) is not None:
            config[target] = body[source]
    seed = config.get("seed")
    if seed is not None and not _INT32_MIN <= seed <= _INT32_MAX:
        raise _invalid("llm_config.seed", "must fit in 32 bits for google_ai (Gemini's seed is an int32)")
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    config.update(_response_format(body.get("response_format"), budget))
    effort = body.get("reasoning_effort")
    if effort:
        config["thinkingConfig"] = _thinking_config(effort, str(body.get("model", "")))
    return config


def _response_format(response_format: object, budget: list[int]) -> dict[str, Any]:
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return {}
    kind = response_format["type"]
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind != "json_schema":
        raise _invalid("response_format.type", "must be text, json_object or json_schema", type=kind)
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        return {"responseMimeType": "application/json"}
    return {
        "responseMimeType": "application/json",
        "responseSchema": convert_schema(schema, "llm_config.response_format.json_schema.schema", budget),
    }


def _thinking_config(effort: object, model: str) -> dict[str, Any]:
    if effort not in _THINKING_BUDGETS:
        raise _invalid("reasoning_effort", "must be none, minimal, low, medium or high", value=effort)
    major = _GEMINI_MAJOR.search(model)
    if major is not None and int(major[1]) >= 3 and effort != "none":
        return {"thinkingLevel": str(effort).upper(), "includeThoughts": True}
    budget = _THINKING_BUDGETS[str(effort)]
    return {"thinkingBudget": budget, "includeThoughts": budget > 0}


# --------------------------------------------------------------------------------------------
# Answers

_CONTENT_FILTER = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)
# The model tried to call a function and produced something that is not a valid call.
_UNPARSEABLE = frozenset({"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"})


def _bad(message: str, **metadata: object) -> UpstreamBadResponse:
    return UpstreamBadResponse(f"{NAME} answered {message}", metadata={"provider": NAME, **metadata})


@dataclass(slots=True)
class _Message:
    """One candidate's parts, sorted into the OpenAI message fields."""

    content: list[str]
    reasoning: list[str]
    tool_calls: list[dict[str, Any]]
    signature: str | None = None


def _read_parts(parts: object, first_index: int) -> _Message:
    message = _Message([], [], [])
    if not isinstance(parts, list):
        raise _bad("a candidate whose content.parts is not a list")
    for part in parts:
        if not isinstance(part, dict):
            raise _bad("a part that is not an object")
        call = part.get("functionCall")
        if isinstance(call, dict):
            message.tool_calls.append(_tool_call(call, part, first_index + len(message.tool_calls)))
        elif part.get("thought"):
            message.reasoning.append(str(part.get("text") or ""))
        elif "text" in part:
            message.content.append(str(part["text"]))
            if part.get("thoughtSignature"):
                message.signature = part["thoughtSignature"]
    return message


def _tool_call(call: dict[str, Any], part: dict[str, Any], index: int) -> dict[str, Any]:
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("a functionCall without a name")
    args = call.get("args") or {}
    out: dict[str, Any] = {
        "id": call.get("id") or f"{_CALL_ID_PREFIX}{index}",
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(args).decode()},
    }
    if part.get("thoughtSignature"):
        out["thought_signature"] = part["thoughtSignature"]
    return out


def _finish_reason(reason: object, candidate: dict[str, Any], has_calls: bool) -> str:
    if reason in _UNPARSEABLE:
        raise UnparseableModelOutput(
            f"{NAME} could not produce a valid function call (finishReason {reason})",
            metadata={"provider": NAME, "finish_reason": reason, **_finish_message(candidate)},
        )
    if reason == "MISSING_THOUGHT_SIGNATURE":
        raise UpstreamRejected(
            f"{NAME} needs the thought signatures of earlier function calls sent back",
            metadata={"provider": NAME, "finish_reason": reason},
        )
    if reason in _CONTENT_FILTER:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _finish_message(candidate: dict[str, Any]) -> dict[str, str]:
    text = candidate.get("finishMessage")
    return {"finish_message": str(text)[:500]} if text else {}


def usage(metadata: object) -> dict[str, Any]:
    """Gemini `usageMetadata` as OpenAI usage (see the module docstring for the arithmetic)."""
    meta = metadata if isinstance(metadata, dict) else {}

    def count(key: str) -> int:
        value = meta.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    prompt = count("promptTokenCount") + count("toolUsePromptTokenCount")
    reasoning = count("thoughtsTokenCount")
    completion = count("candidatesTokenCount") + reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": count("totalTokenCount") or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": count("cachedContentTokenCount")},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _blocked_prompt(payload: dict[str, Any]) -> str | None:
    feedback = payload.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    return str(reason) if reason else None


def _refusal(reason: str, message: object) -> str:
    return f"{NAME} blocked the answer ({reason})" + (f": {message}" if message else "")


def parse_completion(payload: dict[str, Any], *, model: str) -> dict[str, Any]:
    """A `GenerateContentResponse` as an OpenAI ChatCompletion."""
    if not isinstance(payload, dict):
        raise _bad("something that is not a JSON object")
    message: dict[str, Any] = {"role": "assistant", "content": None}
    candidates = payload.get("candidates")
    blocked = _blocked_prompt(payload)
    if not candidates:
        if blocked is None:
            raise _bad("no candidates and no promptFeedback.blockReason")
        message["refusal"] = _refusal(blocked, payload["promptFeedback"].get("blockReasonMessage"))
        finish = "content_filter"
    else:
        candidate = candidates[0] if isinstance(candidates, list) else None
        if not isinstance(candidate, dict):
            raise _bad("candidates that are not a list of objects")
        finish = _candidate_message(candidate, message)
    return {
        "id": str(payload.get("responseId") or ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(payload.get("modelVersion") or model),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage(payload.get("usageMetadata")),
    }


def _candidate_message(candidate: dict[str, Any], message: dict[str, Any]) -> str:
    """Fills `message` from the candidate; returns the finish reason."""
    content = candidate.get("content")
    parts = _read_parts(content.get("parts", []) if isinstance(content, dict) else [], 0)
    reason = candidate.get("finishReason")
    finish = _finish_reason(reason, candidate, bool(parts.tool_calls))
    text = "".join(parts.content)
    if text:
        message["content"] = text
    if parts.reasoning:
        message["reasoning_content"] = "".join(parts.reasoning)
    if parts.tool_calls:
        message["tool_calls"] = parts.tool_calls
    if parts.signature:
        message["thinking_blocks"] = [{"type": THOUGHT_SIGNATURE_BLOCK, "signature": parts.signature}]
    if finish == "content_filter":
        message["refusal"] = _refusal(str(reason), candidate.get("finishMessage"))
    elif not (text or parts.tool_calls) and finish == "stop":
        # Thoughts alone are no answer: the agent would get empty content that says complete.
        if parts.reasoning:  # as the OpenAI-compatible path's (server.core.reasoning_only)
            thoughts = len("".join(parts.reasoning))
            raise _bad(
                f"an answer with only thoughts (finishReason {reason})",
                finish_reason=str(reason),
                cause=REASONING_ONLY,
                reasoning_chars=thoughts,
            )
        raise _bad(f"an empty candidate (finishReason {reason})", finish_reason=str(reason))
    return finish


# --------------------------------------------------------------------------------------------
# Streams


class StreamDecoder:
    """Gemini SSE (`data: <GenerateContentResponse>` events, no event names) to OpenAI chunks.

    Text parts are content deltas, thought parts reasoning deltas, every `functionCall` part a
    complete tool call with its own index. Usage rides on the chunks (the last is final), so it
    is emitted by `finish()`, at the end of the body, with the end marker None. A body that ends
    before a finishReason (or a blocked prompt), or a STOP with nothing (or only thoughts) before
    it, is UPSTREAM_BAD_RESPONSE, never a short or empty answer.
    """

    def __init__(self, *, model: str = "", scrub: Callable[[str], str] = str) -> None:
        self._model = model
        self._scrub = scrub
        self._id = ""
        self._created = int(time.time())
        self._calls = 0
        self._usage: object = None
        self._finished = False
        self._started = False
        self._produced = False  # any content or tool call relayed (thoughts alone are no answer)
        self._thought = 0  # characters of reasoning relayed

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]:
        del event  # Gemini names no events
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _bad("an SSE event that is not JSON") from None
        if not isinstance(payload, dict):
            raise _bad("an SSE event that is not a JSON object")
        # `"error": null` (or {}, "", 0, false) next to candidates is no error, as on the
        # OpenAI-compatible stream (openai_compat reads `event.get("error")` the same way).
        if payload.get("error"):
            raise stream_error(payload, self._scrub)
        self._id = str(payload.get("responseId") or self._id)
        self._model = str(payload.get("modelVersion") or self._model)
        if payload.get("usageMetadata") is not None:
            self._usage = payload["usageMetadata"]
        return self._chunks(payload)

    def finish(self) -> list[dict[str, Any] | None]:
        if not self._finished:
            raise _bad("a stream that ended before a finishReason")
        return [{**self._envelope(), "choices": [], "usage": usage(self._usage)}, None]

    def _chunks(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        candidates = payload.get("candidates")
        if not candidates:
            blocked = _blocked_prompt(payload)
            if blocked is None:
                return []  # a usage-only event
            self._finished = True
            refusal = _refusal(blocked, payload["promptFeedback"].get("blockReasonMessage"))
            return [self._chunk({"refusal": refusal}, "content_filter")]
        candidate = candidates[0] if isinstance(candidates, list) else None
        if not isinstance(candidate, dict):
            raise _bad("candidates that are not a list of objects")
        content = candidate.get("content")
        first_call = self._calls
        parts = _read_parts(content.get("parts", []) if isinstance(content, dict) else [], first_call)
        self._calls += len(parts.tool_calls)
        out: list[dict[str, Any] | None] = []
        delta = _delta(parts, first_call)
        self._produced = self._produced or bool(delta.keys() - {"thinking_blocks", "reasoning_content"})
        self._thought += len(delta.get("reasoning_content", ""))
        if delta or not self._started:
            out.append(self._chunk(delta, None))
        reason = candidate.get("finishReason")
        if reason:
            self._finished = True
            finish = _finish_reason(reason, candidate, self._calls > 0)
            if finish == "stop" and not self._produced and self._thought:
                raise _bad(
                    f"a stream with only thoughts (finishReason {reason})",
                    finish_reason=str(reason),
                    cause=REASONING_ONLY,
                    reasoning_chars=self._thought,
                )
            if finish == "stop" and not self._produced:
                raise _bad(f"an empty stream (finishReason {reason})", finish_reason=str(reason))
            extra = {"refusal": _refusal(str(reason), candidate.get("finishMessage"))}
            out.append(self._chunk(extra if finish == "content_filter" else {}, finish))
        return out

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if not self._started:
            delta = {"role": "assistant", **delta}
            self._started = True
        return {**self._envelope(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _delta(parts: _Message, first_call: int) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if parts.content and any(parts.content):
        delta["content"] = "".join(parts.content)
    if parts.reasoning:
        delta["reasoning_content"] = "".join(parts.reasoning)
    if parts.tool_calls:
        # Each call arrives whole: its own index, numbered across the stream.
        delta["tool_calls"] = [
            {"index": index, **call} for index, call in enumerate(parts.tool_calls, start=first_call)
        ]
    if parts.signature:
        delta["thinking_blocks"] = [{"type": THOUGHT_SIGNATURE_BLOCK, "signature": parts.signature}]
    return delta


# --------------------------------------------------------------------------------------------
# Errors

# "The input token count (1234567) exceeds the maximum number of tokens allowed (1048576)."
_TOKEN_LIMIT = re.compile(r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
# Gemini answers a bad key with 400 INVALID_ARGUMENT and ErrorInfo reason API_KEY_INVALID.
_AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "SERVICE_DISABLED"})
# A 403 about a Files API file the request names (an image URL of another project's file, or an
# expired one): "You do not have permission to access the File x or it may not exist." The key
# is fine; as UPSTREAM_AUTH_FAILED any caller could have a server key disabled with one URL.
_FILE_DENIED = re.compile(r"permission to access the File\b", re.IGNORECASE)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)s\s*")


@dataclass(frozen=True, slots=True)
class _GoogleError:
    """What a `{"error": {"code", "message", "status", "details"}}` body says beyond its message."""

    status: str = ""
    reason: str = ""
    retry_delay: float | None = None


def _google_error(body: bytes) -> _GoogleError:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _GoogleError()
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return _GoogleError()
    reason, delay = "", None
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo"):
            reason = str(detail.get("reason") or "")
        elif kind.endswith("google.rpc.RetryInfo"):
            delay = _duration(detail.get("retryDelay"))
    return _GoogleError(str(error.get("status") or ""), reason, delay)


def _duration(value: object) -> float | None:
    """A protobuf Duration in JSON ("13s", "0.5s"), as the retry loop's seconds.

    Read as a Retry-After in seconds would be, so the same clamping applies to both.
    """
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    return parse_retry_after({"retry-after": match[1]}) if match else None


def error_for_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    scrub: Callable[[str], str],
    in_body: bool = False,
) -> RetryableError | GatewayError:
    """The contract's error for a non-2xx Gemini answer; RetryableError when a retry may help.

    `in_body`: `status` is the `code` of an error event that came inside a stream after HTTP 200;
    mapped the same (Google's RetryInfo and reasons included), the metadata says what came.
    """
    info = _google_error(body)
    message = upstream_message(body, scrub)
    meta: dict[str, object] = {"http_status": status, "provider": NAME}
    text = f"{NAME} answered HTTP {status}"
    if in_body:
        meta = {"http_status": 200, "upstream_code": status, "provider": NAME}
        text = f"{NAME} answered HTTP 200, then an error event (code {status})"
    if info.status:
        meta["upstream_status"] = scrub(info.status)[:100]
    if info.reason:
        meta["upstream_reason"] = scrub(info.reason)[:100]
    text += f": {message}" if message else ""
    if status == 400 and _TOKEN_LIMIT.search(message):
        return ContextWindowExceeded(
            f"{NAME} says the prompt exceeds the model's maximum context length: {message}", metadata=meta
        )
    if status == 403 and info.reason not in _AUTH_REASONS and _FILE_DENIED.search(message):
        return UpstreamRejected(text, metadata=meta)
    if status in (401, 403) or info.reason in _AUTH_REASONS:
        return UpstreamAuthFailed(text, metadata=meta)
    if status == 404 and not in_body:
        return _not_found(info, text, meta)
    if status == 404 and info.status == "NOT_FOUND":
        # After a 200 the path is right: not the base URL's hint, only the model's 404.
        return ModelNotFound(text, metadata={**meta, "not_found": "model"})
    if status in (408, 429) or status >= 500:
        return _retryable(status, text, meta, info.retry_delay, headers)
    if 400 <= status < 500:
        return UpstreamRejected(text, metadata=meta)
    return UpstreamBadResponse(text, metadata=meta)


def stream_error(payload: dict[str, Any], scrub: Callable[[str], str]) -> GatewayError:
    """An error event inside a stream (`{"error": {"code": 429, "status": ..., "details": ...}}`):
    as Gemini's error answer of that code would be, so a 429's RetryInfo (`retryDelay: "13s"`)
    is the caller's RetryInfo, not a default second. As the first event (nothing relayed yet)
    the stream opener retries a 429 or 5xx by that delay (`upstream_retry_after`), and routing
    cools the key down for it; after that the caller gets the error itself."""
    error = payload.get("error")
    code = http_code(error.get("code") if isinstance(error, dict) else None)  # also a proxy's "429"
    if code is None:
        return error_in_body(payload, provider=NAME, scrub=scrub)
    raw = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS, default=str)
    mapped = error_for_status(code, raw, {}, scrub=scrub, in_body=True)
    if not isinstance(mapped, RetryableError):
        return mapped
    # Before anything was relayed the stream is still retried (and cools the deployment down):
    # by Google's own delay, as for the same 429 as an HTTP answer.
    mapped.error.upstream_retry_after = mapped.retry_after
    return mapped.error


def _not_found(info: _GoogleError, text: str, meta: dict[str, object]) -> ModelNotFound | NotFound:
    # Google's own JSON 404 (status NOT_FOUND) is about the model ("models/x is not found for
    # API version v1beta"); anything else is a base URL that does not serve the Gemini API.
    if info.status == "NOT_FOUND":
        return ModelNotFound(text, metadata={**meta, "not_found": "model"})
    hint = f"check the base URL: it should end with /v1beta, as {DEFAULT_BASE_URL}"
    return NotFound(
        f"{NAME} answered HTTP 404 for the generateContent path: {hint}",
        metadata={**meta, "not_found": "endpoint", "hint": hint},
    )


def _retryable(
    status: int, text: str, meta: dict[str, object], body_delay: float | None, headers: Mapping[str, str]
) -> RetryableError:
    # RetryInfo in the body is Google's own hint; a proxy's Retry-After stands in for it.
    hint = body_delay if body_delay is not None else parse_retry_after(headers)
    error: GatewayError
    if status == 429:
        error = RateLimitExceeded(text, metadata=meta, retry_delay=hint if hint is not None else 1.0)
    else:
        error = UpstreamUnavailable(text, metadata=meta, retry_delay=hint)
    return RetryableError(error, status=status, retry_after=hint)
