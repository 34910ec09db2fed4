"""Request shapes, auth headers and answer extraction for each local LLM server type.

Every request is a POST with a JSON body (`?` marks a key sent only when set):

- ollama `/api/generate`: model, prompt, stream, raw: true,
  options {num_ctx, num_predict, stop, temperature?}; text in `response`.
- llamacpp `/completion`: prompt, n_predict, stop, stream, temperature?, grammar?;
  text in `content`.
- vllm `/v1/completions`: model, prompt, max_tokens, stream, user, stop, temperature?;
  text in `choices[0].text`.
- lmstudio `/v1/completions`: prompt, max_tokens, stream, model, stop, temperature?;
  text in `choices[0].text`.
- koboldcpp `/api/v1/generate`: prompt, max_context_length, max_length, stop_sequence,
  temperature?, grammar?; text in `results[0].text`.
- webui `/v1/completions`: prompt, truncation_length, max_tokens, stop, stream, temperature?,
  grammar_string?; text in `choices[0].text`.

A base URL that already ends in `/v1` is not given a second one. `num_ctx`, `max_context_length`
and `truncation_length` are sent only for a positive context window.

Usage comes from each server's own counters: ollama `prompt_eval_count` / `eval_count`;
llama.cpp `tokens_evaluated` / `tokens_predicted` (else `timings.prompt_n` / `predicted_n`);
vllm, lmstudio and webui `usage.prompt_tokens` / `completion_tokens`; koboldcpp reports none.
A prompt count of 0 is reported as unknown (None): LM Studio and the web UI send 0 when they do
not count, and no real prompt is empty. Unknown counts are for the caller to count locally.

Streaming (`stream=True`), the events `parse_stream_event` reads, one decoded JSON object each:
- ollama: NDJSON, one object per line: `{"response": "tok", "done": false}` ... the last one has
  `"done": true` and the counters.
- llamacpp: SSE `data: {"content": "tok", "stop": false}` ... the last has `"stop": true` and the
  counters.
- vllm, lmstudio, webui: OpenAI completions SSE `data: {"choices": [{"text": "tok",
  "finish_reason": null}]}`, ended by `data: [DONE]` (not JSON: the caller stops there). vLLM is
  asked for a final usage chunk (`stream_options.include_usage`): `{"choices": [], "usage": {...}}`.
- koboldcpp: streams from another path, POST `/api/extra/generate/stream`, SSE events
  `event: message` / `data: {"token": "tok", "finish_reason": null}`; the last has a
  `finish_reason`. No usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import FieldViolation, InvalidRequest, UpstreamBadResponse
from server.setting_names import LOCAL_AUTH_TYPES  # re-exported: defined once

ENDPOINT_TYPES = ("ollama", "llamacpp", "vllm", "lmstudio", "koboldcpp", "webui")
# `LLMGW_LOCAL_AUTH_TYPE` values besides "" (no auth header).

GRAMMAR_ENDPOINT_TYPES = frozenset({"llamacpp", "koboldcpp", "webui"})
# Used when the caller sets no max_tokens; servers' own defaults are far too short (vLLM 16,
# koboldcpp 100) for a function call carrying inner thoughts, and llama.cpp's (-1) is unbounded.
# A call with a few sentences of inner thoughts is 100-300 tokens: 1024 leaves room, and bounds
# what a weak model that never stops costs (it was 3000: 116 s on a small CPU server).
DEFAULT_MAX_TOKENS = 1024

_PATHS = {
    "ollama": "/api/generate",
    "llamacpp": "/completion",
    "vllm": "/v1/completions",
    "lmstudio": "/v1/completions",
    "koboldcpp": "/api/v1/generate",
    "webui": "/v1/completions",
}
_KOBOLDCPP_STREAM_PATH = "/api/extra/generate/stream"
_ERROR_TEXT_LIMIT = 300


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """One upstream call: POST `body` as JSON to `url`."""

    url: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LocalCompletion:
    """The text and the token counts a server reported (None: not reported)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    truncated: bool = False  # the server stopped at the token limit (see _hit_limit)


@dataclass(frozen=True, slots=True)
class LocalStreamChunk:
    """One streamed event: its text, whether the server said it finished, and any counters."""

    text: str
    done: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    truncated: bool = False  # this (last) event says the token limit stopped the generation


def check_endpoint_type(endpoint_type: str) -> str:
    """The endpoint type, or InvalidRequest naming `llm_config.model_endpoint_type`."""
    if endpoint_type not in _PATHS:
        description = f"unknown local endpoint type {endpoint_type!r}; known: {', '.join(ENDPOINT_TYPES)}"
        raise _invalid("llm_config.model_endpoint_type", description)
    return endpoint_type


def accepts_grammar(endpoint_type: str) -> bool:
    """Whether this server type takes a GBNF grammar."""
    return check_endpoint_type(endpoint_type) in GRAMMAR_ENDPOINT_TYPES


def stream_framing(endpoint_type: str) -> Literal["ndjson", "sse"]:
    """How the server frames a streamed answer: JSON lines (ollama) or server-sent events."""
    return "ndjson" if check_endpoint_type(endpoint_type) == "ollama" else "sse"


def build_local_request(
    endpoint_type: str,
    *,
    base_url: str,
    model: str,
    prompt: str,
    context_window: int,
    max_tokens: int | None,
    grammar: str | None,
    user: str,
    stop: list[str],
    stream: bool,
    temperature: float | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> LocalRequest:
    """The URL and JSON body for one completion on a local server of `endpoint_type`.

    `sampling`: top_p, seed, frequency_penalty, presence_penalty as the caller set them
    (`local_sampling`), sent under each server's own names (koboldcpp has no OpenAI penalties:
    its rep_pen means something else, so they are not sent there)."""
    kind = check_endpoint_type(endpoint_type)
    if grammar is not None and kind not in GRAMMAR_ENDPOINT_TYPES:
        description = (
            f"{kind} does not accept a grammar; use a wrapper without '-grammar', or one of "
            f"{', '.join(sorted(GRAMMAR_ENDPOINT_TYPES))}"
        )
        raise _invalid("llm_config.model_wrapper", description)
    if kind in ("ollama", "vllm") and not model:
        raise _invalid("llm_config.model", f"{kind} needs a model name")
    limit = max_tokens if max_tokens is not None and max_tokens > 0 else DEFAULT_MAX_TOKENS
    body: dict[str, Any]

    if kind == "ollama":
        options: dict[str, Any] = {"num_predict": limit, "stop": list(stop)}
        if context_window > 0:
            options["num_ctx"] = context_window
        if temperature is not None:
            options["temperature"] = temperature
        body = {"model": model, "prompt": prompt, "stream": stream, "raw": True, "options": options}
    elif kind == "llamacpp":
        body = {"prompt": prompt, "n_predict": limit, "stop": list(stop), "stream": stream}
        if grammar is not None:
            body["grammar"] = grammar
    elif kind == "vllm":
        body = {"model": model, "prompt": prompt, "max_tokens": limit, "stream": stream, "user": user}
        body["stop"] = list(stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif kind == "lmstudio":
        body = {"prompt": prompt, "max_tokens": limit, "stream": stream, "model": model, "stop": list(stop)}
    elif kind == "koboldcpp":
        body = {"prompt": prompt, "max_length": limit, "stop_sequence": list(stop)}
        if context_window > 0:
            body["max_context_length"] = context_window
        if grammar is not None:
            body["grammar"] = grammar
    else:  # webui
        body = {"prompt": prompt, "max_tokens": limit, "stop": list(stop), "stream": stream}
        if context_window > 0:
            body["truncation_length"] = context_window
        if grammar is not None:
            body["grammar_string"] = grammar
    if temperature is not None and kind != "ollama":
        body["temperature"] = temperature
    if sampling:
        if kind == "ollama":
            body["options"].update(sampling)
        elif kind == "koboldcpp":
            if "top_p" in sampling:
                body["top_p"] = sampling["top_p"]
            if "seed" in sampling:
                body["sampler_seed"] = sampling["seed"]
        else:
            body.update(sampling)

    path = _KOBOLDCPP_STREAM_PATH if kind == "koboldcpp" and stream else _PATHS[kind]
    return LocalRequest(url=join_url(base_url, path), body=body)


_SAMPLING = ("top_p", "seed", "frequency_penalty", "presence_penalty")


def local_sampling(config: Any) -> dict[str, Any]:
    """The sampling parameters an LLMConfig sets, by their OpenAI names (see build_local_request).

    A JSON response format is INVALID_ARGUMENT here: the local path renders a prompt and parses
    text, and ignoring the format would change the answer's shape."""
    if config.HasField("response_format") and config.response_format.type not in ("", "text"):
        raise _invalid(
            "llm_config.response_format.type", "is not supported for local endpoint types (only text)"
        )
    return {name: getattr(config, name) for name in _SAMPLING if config.HasField(name)}


def join_url(base_url: str, path: str) -> str:
    """`base_url` + `path`, without a doubled `/v1`; InvalidRequest for a non-HTTP base URL."""
    base = base_url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise _invalid("llm_config.model_endpoint", "a local endpoint must be an http:// or https:// URL")
    if path.startswith("/v1/") and base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + path


def auth_headers(auth_type: str, api_key: str) -> dict[str, str]:
    """Headers for the configured local-server auth: "" (none), "bearer_token" or "api_key"."""
    if auth_type == "":
        return {}
    if auth_type not in LOCAL_AUTH_TYPES:
        raise InvalidRequest(
            f"unknown local server auth type {auth_type!r}; expected '', 'bearer_token' or 'api_key'"
        )
    if not api_key:
        raise InvalidRequest(f"local server auth type {auth_type!r} is configured without a key")
    if auth_type == "bearer_token":
        return {"Authorization": f"Bearer {api_key}"}
    return {"api-key": api_key}


def extract_completion(endpoint_type: str, payload: dict[str, Any]) -> LocalCompletion:
    """The completion text and the server's own token counts from a non-streamed answer."""
    kind = check_endpoint_type(endpoint_type)
    if kind == "ollama":
        text = _require_text(kind, payload.get("response"), "response", payload)
        return LocalCompletion(
            text,
            _prompt_count(payload.get("prompt_eval_count")),
            _count(payload.get("eval_count")),
            _hit_limit(kind, payload),
        )
    if kind == "llamacpp":
        text = _require_text(kind, payload.get("content"), "content", payload)
        prompt, completion = _llamacpp_counts(payload)
        return LocalCompletion(text, prompt, completion, _hit_limit(kind, payload))
    if kind == "koboldcpp":
        results = payload.get("results")
        first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
        text = _require_text(kind, first.get("text"), "results[0].text", payload)
        return LocalCompletion(text, None, None, _hit_limit(kind, first))
    choices = payload.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    text = _require_text(kind, first.get("text"), "choices[0].text", payload)
    prompt, completion = _openai_usage(payload)
    return LocalCompletion(text, prompt, completion, _hit_limit(kind, first))


def parse_stream_event(endpoint_type: str, event: dict[str, Any]) -> LocalStreamChunk:
    """Text, end-of-generation flag and counters from one streamed event (see module docstring)."""
    kind = check_endpoint_type(endpoint_type)
    if "error" in event and not any(k in event for k in ("response", "content", "choices", "token")):
        raise UpstreamBadResponse(
            f"{kind} reported an error mid-stream: {str(event['error'])[:_ERROR_TEXT_LIMIT]}",
            metadata={"endpoint_type": kind},
        )
    if kind == "ollama":
        done = event.get("done") is True
        return LocalStreamChunk(
            _str(event.get("response")),
            done,
            _prompt_count(event.get("prompt_eval_count")) if done else None,
            _count(event.get("eval_count")) if done else None,
            done and _hit_limit(kind, event),
        )
    if kind == "llamacpp":
        done = event.get("stop") is True
        prompt, completion = _llamacpp_counts(event) if done else (None, None)
        return LocalStreamChunk(
            _str(event.get("content")), done, prompt, completion, done and _hit_limit(kind, event)
        )
    if kind == "koboldcpp":
        return LocalStreamChunk(
            _str(event.get("token")),
            event.get("finish_reason") not in (None, ""),
            truncated=_hit_limit(kind, event),
        )
    choices = event.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    prompt, completion = _openai_usage(event)
    return LocalStreamChunk(
        _str(first.get("text")),
        first.get("finish_reason") is not None,
        prompt,
        completion,
        _hit_limit(kind, first),
    )


def _hit_limit(kind: str, payload: dict[str, Any]) -> bool:
    """Whether the server says the generation stopped at the token limit.

    ollama `done_reason: "length"`; llama.cpp `stop_type: "limit"` (older builds:
    `stopped_limit: true`); the OpenAI-style servers and koboldcpp `finish_reason: "length"`.
    """
    if kind == "ollama":
        return payload.get("done_reason") == "length"
    if kind == "llamacpp":
        return payload.get("stop_type") == "limit" or payload.get("stopped_limit") is True
    return payload.get("finish_reason") == "length"


def _require_text(kind: str, value: Any, field: str, payload: dict[str, Any]) -> str:
    if isinstance(value, str):
        return value
    detail = f": {str(payload['error'])[:_ERROR_TEXT_LIMIT]}" if "error" in payload else ""
    raise UpstreamBadResponse(
        f"{kind} answered without a text field `{field}`{detail}", metadata={"endpoint_type": kind}
    )


def _llamacpp_counts(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    prompt = _prompt_count(payload.get("tokens_evaluated"))
    completion = _count(payload.get("tokens_predicted"))
    timings = payload.get("timings")
    if isinstance(timings, dict):
        prompt = prompt if prompt is not None else _prompt_count(timings.get("prompt_n"))
        completion = completion if completion is not None else _count(timings.get("predicted_n"))
    return prompt, completion


def _openai_usage(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return _prompt_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _prompt_count(value: Any) -> int | None:
    count = _count(value)
    return count if count else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _invalid(field: str, description: str) -> InvalidRequest:
    return InvalidRequest(
        description, field_violations=[FieldViolation(field=field, description=description)]
    )
