"""Request validation: every problem found at once, as BadRequest field violations."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from llmgateway.v1 import chat_pb2

from server.errors import FieldViolation, InvalidRequest

OPENAI_COMPATIBLE_TYPES = frozenset({"openai"})
LOCAL_TYPES = frozenset({"ollama", "llamacpp", "vllm", "lmstudio", "koboldcpp", "webui"})
KNOWN_TYPES = OPENAI_COMPATIBLE_TYPES | LOCAL_TYPES

# A single message this large is never a real prompt (about 500k tokens of text); refusing it
# early keeps one request from tying up the tokenizer and memory.
MAX_MESSAGE_CHARS = 2_000_000
MAX_MESSAGES = 10_000
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VALID_ROLES = frozenset(chat_pb2.Role.values()) - {chat_pb2.ROLE_UNSPECIFIED}


def validate_request(request: chat_pb2.CreateRequest) -> None:
    """Raise InvalidRequest listing every invalid field of a Create/StreamCreate/CountTokens request."""
    violations: list[FieldViolation] = []
    add = violations.append
    config = request.llm_config
    if not config.model:
        add(FieldViolation("llm_config.model", "required"))
    endpoint_type = config.model_endpoint_type
    if endpoint_type not in KNOWN_TYPES:
        add(
            FieldViolation(
                "llm_config.model_endpoint_type",
                f"unknown endpoint type {endpoint_type!r}; one of {', '.join(sorted(KNOWN_TYPES))}",
            )
        )
    if config.model_endpoint:
        parts = urlsplit(config.model_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            add(FieldViolation("llm_config.model_endpoint", "must be an http(s) URL"))
    elif endpoint_type in LOCAL_TYPES:
        add(FieldViolation("llm_config.model_endpoint", f"required for {endpoint_type}"))
    if config.context_window < 0:
        add(FieldViolation("llm_config.context_window", "must not be negative"))
    if config.HasField("max_tokens") and config.max_tokens < 1:
        add(FieldViolation("llm_config.max_tokens", "must be at least 1"))
    if config.HasField("temperature") and not 0.0 <= config.temperature <= 2.0:
        add(FieldViolation("llm_config.temperature", "must be between 0 and 2"))
    if not request.messages:
        add(FieldViolation("messages", "at least one message is required"))
    elif len(request.messages) > MAX_MESSAGES:
        add(FieldViolation("messages", f"at most {MAX_MESSAGES} messages"))
    for i, message in enumerate(request.messages):
        if message.role not in _VALID_ROLES:
            add(FieldViolation(f"messages[{i}].role", "must be one of ROLE_SYSTEM, ROLE_DEVELOPER, "
                                                       "ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL"))
        if len(message.content) > MAX_MESSAGE_CHARS:
            add(FieldViolation(f"messages[{i}].content", f"longer than {MAX_MESSAGE_CHARS} characters"))
        if message.role == chat_pb2.ROLE_TOOL and not message.tool_call_id:
            add(FieldViolation(f"messages[{i}].tool_call_id", "required for tool messages"))
    names = set()
    for i, function in enumerate(request.functions):
        if not _FUNCTION_NAME.match(function.name):
            add(FieldViolation(f"functions[{i}].name", "must match ^[A-Za-z0-9_-]{1,64}$"))
        elif function.name in names:
            add(FieldViolation(f"functions[{i}].name", f"duplicate function {function.name!r}"))
        names.add(function.name)
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        raise InvalidRequest(
            f"invalid request: {summary}",
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )
