"""A 4xx that says the prompt does not fit the model's context: CONTEXT_WINDOW_EXCEEDED.

An agent acts on that reason (it summarizes its history and retries); UPSTREAM_REJECTED tells it
nothing. The servers' own shapes, and the counts each puts in its metadata:

- llama.cpp `llama-server` (400): `{"error": {"code": 400, "type": "exceed_context_size_error",
  "message": "request (6023 tokens) exceeds the available context size (4096 tokens), ...",
  "n_prompt_tokens": 6023, "n_ctx": 4096}}` -> `prompt_tokens`, `context_window`.
- vLLM and OpenAI (400): "This model's maximum context length is 4096 tokens. However, you
  requested 5000 tokens (4000 in the messages, 1000 in the completion)." or (newer vLLM)
  "... maximum context length is 4096 tokens and your request has 4100 input tokens ..." or
  "The prompt (total length 5000) is too long to fit into the model (context length 4096)";
  vLLM's engine (V1): "The decoder prompt (length 5000) is longer than the maximum model length of
  4096. Make sure that `max_model_len` is no smaller than the number of text tokens.";
  OpenAI's `code: context_length_exceeded` -> `context_window`, `requested_tokens`, `prompt_tokens`.
- Ollama (400/500 text): "input length exceeds maximum context length" / "the input length
  exceeds the context length" (no counts).
- LM Studio (400): "Trying to keep the first 5000 tokens when context the overflows. However, the
  model is loaded with context length of only 4096 tokens, which is not enough." ->
  `prompt_tokens`, `context_window`.
- koboldcpp and the text-generation web UI cut the prompt to `max_context_length` /
  `truncation_length` themselves and report no error.

Only the counts are copied into metadata (integers), never the body: the message text is the
upstream's, scrubbed by the caller.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from server.errors import ContextWindowExceeded

_MAX_SCAN = 4096  # characters of the message searched: the phrases are at its start
_INT = r"(\d{1,12})"
_CONTEXT = re.compile(r"maximum context length is " + _INT + r" tokens", re.IGNORECASE)
_REQUESTED = re.compile(r"you requested " + _INT + r" tokens", re.IGNORECASE)
_MESSAGES = re.compile(_INT + r" in the messages", re.IGNORECASE)
_INPUT = re.compile(r"your (?:request|prompt) has " + _INT + r" input tokens", re.IGNORECASE)
_RESULTED = re.compile(r"your messages resulted in " + _INT + r" tokens", re.IGNORECASE)
_VLLM_PROMPT = re.compile(
    r"prompt \(total length " + _INT + r"\) is too long to fit into the model \(context length " + _INT,
    re.IGNORECASE,
)
_LLAMACPP = re.compile(
    r"request \(" + _INT + r" tokens\) exceeds the available context size \(" + _INT + r" tokens\)",
    re.IGNORECASE,
)
_LMSTUDIO = re.compile(
    r"keep the first "
    + _INT
    + r" tokens when context the overflows.*?context length of only "
    + _INT
    + r" tokens",
    re.IGNORECASE | re.DOTALL,
)
_VLLM_DECODER = re.compile(
    r"prompt \(length " + _INT + r"\) is longer than the maximum model length of " + _INT, re.IGNORECASE
)
_PHRASES = re.compile(
    r"maximum context length|exceeds the (?:available )?context size|context length of only|"
    r"input length exceeds the (?:maximum )?context length|too long to fit into the model|"
    r"longer than the maximum model length|context_length_exceeded|exceed_context_size_error",
    re.IGNORECASE,
)


def overflow_error(
    status: int, body: bytes, text: str, meta: dict[str, object]
) -> ContextWindowExceeded | None:
    """CONTEXT_WINDOW_EXCEEDED for an overflow answer (`text`: the scrubbed message to report,
    `meta`: the metadata so far), else None."""
    if not 400 <= status < 500 or status in (401, 403, 404, 429):
        return None
    payload = _json(body)
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    message = _message(payload, error, body)[:_MAX_SCAN]
    kind = str(error.get("type") or "")
    code = str(error.get("code") or "")
    if not (
        kind == "exceed_context_size_error" or code == "context_length_exceeded" or _PHRASES.search(message)
    ):
        return None
    counts: dict[str, object] = {}
    # llama.cpp's own fields first: exact, not parsed out of prose.
    _put(counts, "prompt_tokens", error.get("n_prompt_tokens"))
    _put(counts, "context_window", error.get("n_ctx"))
    if match := _LLAMACPP.search(message):
        counts.setdefault("prompt_tokens", int(match.group(1)))
        counts.setdefault("context_window", int(match.group(2)))
    if match := _VLLM_PROMPT.search(message):
        counts.setdefault("prompt_tokens", int(match.group(1)))
        counts.setdefault("context_window", int(match.group(2)))
    if match := _VLLM_DECODER.search(message):
        counts.setdefault("prompt_tokens", int(match.group(1)))
        counts.setdefault("context_window", int(match.group(2)))
    if match := _LMSTUDIO.search(message):
        counts.setdefault("prompt_tokens", int(match.group(1)))
        counts.setdefault("context_window", int(match.group(2)))
    if match := _CONTEXT.search(message):
        counts.setdefault("context_window", int(match.group(1)))
    if match := _REQUESTED.search(message):
        counts.setdefault("requested_tokens", int(match.group(1)))
    for pattern in (_MESSAGES, _INPUT, _RESULTED):
        if match := pattern.search(message):
            counts.setdefault("prompt_tokens", int(match.group(1)))
    return ContextWindowExceeded(
        f"{text} (the upstream's maximum context length was exceeded)",
        metadata={**meta, "source": "upstream", **counts},
    )


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _message(payload: Any, error: dict[str, Any], body: bytes) -> str:
    if error.get("message") is not None:
        return str(error["message"])
    if isinstance(payload, dict):
        for key in ("message", "error", "detail"):
            if isinstance(payload.get(key), str):
                return str(payload[key])
    if payload is None:
        return body[:_MAX_SCAN].decode("utf-8", "replace")
    return ""


def _put(counts: dict[str, object], key: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        counts[key] = value
