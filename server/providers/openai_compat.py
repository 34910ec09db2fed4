"""Upstream calls: one JSON answer, or an SSE stream; and the OpenAI-compatible dialect.

The plumbing here (`post_json`, `open_stream`, `sse_batches`, `sse_events`) is shared by every
provider: it takes the provider's URL and headers (`UpstreamTarget`) and its `Provider` for what
differs (error classification, answer parsing, the stream decoder). `OPENAI` is the
OpenAI-compatible `Provider` (`/chat/completions`, Bearer auth, the body as built internally).

Both paths retry through `server.core.retry` before anything was relayed; a stream is never
retried after its first event was handed on. The caller's deadline bounds every attempt and
every sleep, and is the upstream timeout; without one, `upstream_timeout` bounds a unary call
and every read of a stream.

Failures map to the contract's table: HTTP statuses via `server.providers.errors`; transport
failures (refused, reset, broken body) to UPSTREAM_UNAVAILABLE (retryable before the first
event); anything unreadable (not JSON, not an object, choices of the wrong shape, an SSE event
that is not JSON) to UPSTREAM_BAD_RESPONSE; running out of the caller's deadline to
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from server.auth.resolver import ForbiddenAddressError
from server.config import RetrySettings
from server.core import tools, upstream_kind
from server.core.completion import MAX_CHOICES, MAX_TOOL_CALLS, too_many
from server.core.retry import Deadline, RetryableError, call_with_retries
from server.errors import (
    DeadlineExceeded,
    EndpointNotAllowed,
    FailedPrecondition,
    GatewayError,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from server.providers import errors
from server.providers.base import Provider, StreamDecoder, UpstreamTarget
from server.providers.errors import (
    body_error,
    connection_error,
    error_in_body,
    scrubbed_prefix,
)
from server.providers.http import (
    BodyTooLargeError,
    FixedHeaders,
    HttpClient,
    IdleTimeoutError,
    InvalidHeaderError,
    InvalidResponseError,
    InvalidURLError,
    Response,
    Timeout,
)

MAX_BODY_BYTES = 64 * 1024 * 1024
# One SSE event (its data lines) or one NDJSON line, and any single line of a stream: bigger is
# UPSTREAM_BAD_RESPONSE. Real chunks are a few hundred bytes; this leaves room for a proxy that
# sends a whole answer as one event, up to the default answer cap (LLMGW_MAX_ANSWER_BYTES).
MAX_EVENT_BYTES = 32 * 1024 * 1024
# Sent before a target's own headers (which override them case-insensitively): fixed, so the
# client builds their lines once.
_JSON_HEADERS = FixedHeaders({"Content-Type": "application/json", "Accept": "application/json"})
_SSE_HEADERS = FixedHeaders({"Content-Type": "application/json", "Accept": "text/event-stream"})
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


@dataclass(slots=True)
class CallOptions:
    """What every upstream call needs besides the body."""

    deadline: Deadline
    retry: RetrySettings
    default_timeout: float  # used when the caller set no deadline
    scrub: Callable[[str], str]
    on_retry: Callable[[int, float, int], None] | None = None

    def timeout(self, *, stream: bool = False) -> Timeout:
        remaining = self.deadline.remaining()
        if remaining is None:
            return _timeout_without_deadline(self.default_timeout, stream)
        if remaining <= 0:
            raise DeadlineExceeded("the caller's deadline passed before the upstream answered")
        return Timeout(total=remaining)


@lru_cache(maxsize=16)
def _timeout_without_deadline(default_timeout: float, stream: bool) -> Timeout:
    """The same few values on every call without a deadline (a Timeout is immutable, so one is
    shared; making one costs several microseconds)."""
    if stream:  # a long answer may stream for longer; a silent upstream may not
        return Timeout(total=None, idle=default_timeout)
    return Timeout(total=default_timeout)


# A chunk of at most this many bytes besides its text may become a stream's template.
_TEMPLATE_BYTES = 2048
_TEMPLATE_LEARNS = 4  # templates one stream may learn (each costs one parse more)
_PROBE = "llmgw-template-probe"
_SCALARS = (str, int, float, bool, type(None))


class OpenAIStreamDecoder:
    """OpenAI `chat.completion.chunk` events: each `data:` is one chunk, `[DONE]` the end.

    A stream's chunks are mostly the same bytes but for their text. Once a chunk of text content
    alone was parsed, its bytes before and after the text are the stream's template, and a later
    event that is that prefix, plain text and that suffix is that chunk with this text, built
    without parsing the rest again: what `orjson.loads` and `check_shape` give, as the text has
    no quote, backslash or control character (one JSON string, whatever it holds) and is valid
    UTF-8. A template is kept only if a parse with a probe text in its place changed exactly the
    delta's content, and only of scalar fields besides that one choice's delta (every chunk
    built from it is a new object: nothing handed out is shared). A stream learns again after
    two misses in a row (its chunks changed shape), at most `_TEMPLATE_LEARNS` times (a try
    that fails counts too: a stream whose chunks never fit stops trying).
    """

    __slots__ = ("_provider", "_scrub", "_prefix", "_suffix", "_chunk", "_choice", "_learns", "_missed")

    def __init__(self, *, provider: str, scrub: Callable[[str], str]) -> None:
        self._provider = provider
        self._scrub = scrub
        self._prefix = b""  # b"" until a template was learnt
        self._suffix = b""
        self._chunk: dict[str, Any] = {}
        self._choice: dict[str, Any] = {}
        self._learns = _TEMPLATE_LEARNS
        self._missed = True  # the last event did not fit the template (there is none yet)

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]:
        # The event name is ignored: OpenAI sends none, and proxies' names carry nothing more.
        prefix = self._prefix
        if prefix:
            # The text between the template's prefix and suffix, if the event has both: each
            # removal takes its whole length or nothing (both are non-empty), and the suffix is
            # looked for after the prefix (they never overlap). removeprefix/removesuffix take
            # one argument: no PyArg_ParseTuple, where startswith, endswith and a slice cost
            # ~4x as much (every chunk of every stream).
            suffix = self._suffix
            raw = data.removeprefix(prefix).removesuffix(suffix)
            if len(raw) == len(data) - len(prefix) - len(suffix):
                if 34 not in raw and 92 not in raw:  # no quote, no backslash (ints: memchr)
                    try:
                        text = raw.decode()
                    except UnicodeDecodeError:
                        text = ""
                    # No control character (isprintable is stricter: the rest are parsed below).
                    if text.isprintable() and (text or not raw):
                        self._missed = False
                        built = self._chunk.copy()
                        choice = self._choice.copy()
                        choice["delta"] = {"content": text}
                        built["choices"] = [choice]
                        return [built]
        chunk = _decode_event(data, self._provider, self._scrub)
        if self._missed and self._learns and chunk is not None:
            self._learn(chunk, data)
        self._missed = True
        return [chunk]  # (positional: per chunk)

    def _learn(self, chunk: dict[str, Any], data: bytes) -> None:
        """Keep `data` as the template if it is a chunk of text content alone (see the class)."""
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choice := choices[0]) is not dict:
            return
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1 or type(text := delta.get("content")) is not str:
            return
        if len(data) > _TEMPLATE_BYTES + 4 * len(text) or text == _PROBE:
            return
        if '"' in text or "\\" in text or not text.isprintable():
            return  # JSON writes it with escapes: nothing to learn from (the next text may be)
        # Every attempt from here on counts: a stream whose chunks can never be one (a field
        # that is not a scalar, in every chunk; text written with escapes JSON does not need)
        # tried again at every chunk, at the cost of a parse.
        self._learns -= 1
        if not all(type(v) in _SCALARS for k, v in chunk.items() if k != "choices"):
            return
        if not all(type(v) in _SCALARS for k, v in choice.items() if k != "delta"):
            return
        raw = text.encode()
        at = data.find(b'"content":"' + raw + b'"')
        if at < 0:  # written with escapes: nothing to learn from
            return
        prefix, suffix = data[: at + 11], data[at + 11 + len(raw) :]
        if len(prefix) + len(suffix) > _TEMPLATE_BYTES:
            return
        try:
            probed = orjson.loads(prefix + _PROBE.encode() + suffix)
        except orjson.JSONDecodeError:
            return
        expected = {**chunk, "choices": [{**choice, "delta": {"content": _PROBE}}]}
        if probed != expected:  # the text there is not exactly the delta's content
            return
        # Copies with the places every chunk fills in anew (no reference to this chunk's text).
        self._chunk, self._choice = {**chunk, "choices": None}, {**choice, "delta": None}
        self._prefix, self._suffix = prefix, suffix

    def finish(self) -> list[dict[str, Any] | None]:
        # No `[DONE]` before the end of the body: the gateway decides from the finish reasons.
        return []


class OpenAICompatible:
    """The OpenAI Chat Completions dialect: the internal body is sent as it is."""

    name = "openai"

    def endpoint_url(self, base_url: str, model: str, *, stream: bool) -> str:
        return base_url + "/chat/completions"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def build_body(self, body: dict[str, Any], *, stream: bool) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        # The usual body sets none of them: one pass over its keys, no list built.
        refused = [] if _REFUSED_KEYS.isdisjoint(body) else [k for k in REASONING_MODEL_REFUSES if k in body]
        if refused and tools.is_openai_reasoning_model(str(body.get("model", ""))):
            # o1/o3/o4/gpt-5 answer 400 "Unsupported parameter" for these (temperature is
            # already sent as 1.0 for them by build_chat_body).
            body = {k: v for k, v in body.items() if k not in REASONING_MODEL_REFUSES}
            notes.extend(refused)
        messages = body["messages"]
        for message in messages:  # _has_opaque_parts, inline: this runs for every message of every call
            if "thinking_blocks" in message or "reasoning_content" in message:
                break
            calls = message.get("tool_calls")
            if calls and any("thought_signature" in call for call in calls):
                break
        else:
            return body, notes
        # A history from Anthropic or Gemini (or a DeepSeek reasoning_content): their opaque
        # reasoning parts mean nothing here, and OpenAI refuses unknown message fields.
        out = {**body, "messages": [without_opaque_parts(m) for m in messages]}
        return out, [*notes, *_opaque_notes(messages)]

    def parse_answer(
        self, raw: bytes, *, provider: str, model: str, scrub: Callable[[str], str]
    ) -> dict[str, Any]:
        return parse_json_object(raw, provider=provider, scrub=scrub, retryable=True)

    def stream_decoder(self, *, provider: str, model: str, scrub: Callable[[str], str]) -> StreamDecoder:
        return OpenAIStreamDecoder(provider=provider, scrub=scrub)

    def error_for_status(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        *,
        provider: str,
        scrub: Callable[[str], str],
    ) -> RetryableError | GatewayError:
        return errors.error_for_status(status, body, headers, provider=provider, scrub=scrub)


OPENAI: Provider = OpenAICompatible()


def answer_is_body_json(dialect: Provider) -> bool:
    """Whether `dialect`'s unary answer is the upstream's body as decoded (this class's
    `parse_answer`, not overridden; a translated answer is built anew and may synthesize text).

    Then every text `answer_bytes` counts is decoded from a string of its own in the body (one
    JSON value each, never counted twice), and none is longer in UTF-8 than it was there: bytes
    outside escapes are copied as they are, and an escape is never shorter than what it decodes
    to (`\\n` 2 bytes for 1, `\\u00e9` 6 for 2, a `\\ud83d\\ude00` pair 12 for 4; orjson refuses
    a lone surrogate). So the answer counts fewer bytes than the body holds, and a body within
    LLMGW_MAX_ANSWER_BYTES needs no walk to prove the answer is.
    """
    return getattr(type(dialect), "parse_answer", None) is OpenAICompatible.parse_answer


# Sampling parameters OpenAI's reasoning families refuse.
REASONING_MODEL_REFUSES = ("top_p", "frequency_penalty", "presence_penalty")
_REFUSED_KEYS = frozenset(REASONING_MODEL_REFUSES)
# Message fields only some providers take back: other providers' thinking parts, and the
# reasoning_content a client returns for DeepSeek's thinking mode (server.providers.deepseek).
OPAQUE_MESSAGE_FIELDS = ("thinking_blocks", "reasoning_content")


def _has_opaque_parts(message: dict[str, Any]) -> bool:
    if "thinking_blocks" in message or "reasoning_content" in message:
        return True
    return any("thought_signature" in call for call in message.get("tool_calls") or ())


def _opaque_notes(messages: list[dict[str, Any]]) -> list[str]:
    notes = []
    if any(
        "thinking_blocks" in m or any("thought_signature" in c for c in m.get("tool_calls") or ())
        for m in messages
    ):
        notes.append("thinking_blocks")
    if any("reasoning_content" in m for m in messages):
        notes.append("messages[].reasoning_content")
    return notes


def without_opaque_parts(message: dict[str, Any], *, keep_reasoning: bool = False) -> dict[str, Any]:
    """`message` without other providers' thinking parts (and, unless `keep_reasoning`, without
    its reasoning_content); the same object when it has none."""
    if not _has_opaque_parts(message):
        return message
    drop = ("thinking_blocks",) if keep_reasoning else OPAQUE_MESSAGE_FIELDS
    out = {k: v for k, v in message.items() if k not in drop}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {k: v for k, v in call.items() if k != "thought_signature"} for call in message["tool_calls"]
        ]
    return out


def _too_large(target: UpstreamTarget) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"{target.provider} answered a body over {MAX_BODY_BYTES} bytes",
        metadata={"provider": target.provider, "limit_bytes": MAX_BODY_BYTES},
    )


async def post_json(
    client: HttpClient,
    target: UpstreamTarget,
    url: str,
    body: bytes,
    options: CallOptions,
    *,
    dialect: Provider = OPENAI,
    model: str = "",
) -> tuple[bytes, dict[str, Any]]:
    """POST a JSON body; return the raw answer and its internal (OpenAI-shaped) JSON (retries
    included). `dialect` classifies error statuses and parses the answer."""

    async def attempt() -> tuple[bytes, dict[str, Any]]:
        try:
            response = await client.post(
                url,
                body,
                target.headers,
                options.timeout(),
                private_ok=target.private_ok,
                fixed=_JSON_HEADERS,
            )
            raw = await response.read(MAX_BODY_BYTES)  # the connection goes back to the pool
        except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
            raise transport_error(exc, options, target) from exc
        except BodyTooLargeError as exc:
            raise _too_large(target) from exc
        status = response.status or 0
        if status >= 300:
            raise errors.keep_error_body(
                dialect.error_for_status(
                    status, raw, response.headers, provider=target.provider, scrub=options.scrub
                ),
                status,
                raw,
                options.scrub,
            )
        answer = dialect.parse_answer(raw, provider=target.provider, model=model, scrub=options.scrub)
        upstream_kind.learn(target.base_url, response.headers, answer)  # llama-server's?
        return raw, answer

    return await call_with_retries(
        attempt, settings=options.retry, deadline=options.deadline, on_retry=options.on_retry
    )


def transport_error(
    exc: BaseException, options: CallOptions, target: UpstreamTarget
) -> GatewayError | RetryableError:
    """The error for a failure to talk to the upstream at all (connect, send, read)."""
    # Idle timeouts are both HttpClientError and TimeoutError: timeouts first.
    if isinstance(exc, TimeoutError):
        return _timed_out(options, target)
    if isinstance(exc, InvalidURLError):
        return UpstreamUnavailable(
            f"{target.provider} endpoint is not a usable URL",
            metadata={"provider": target.provider, "error_type": type(exc).__name__},
        )
    if isinstance(exc, InvalidHeaderError):
        # A key (or configured header) with a line break: no upstream could be asked with it.
        if exc.header.lower() == "authorization":
            return UpstreamAuthFailed(
                f"the API key for {target.provider} has characters an HTTP header cannot carry",
                metadata={"provider": target.provider},
            )
        return FailedPrecondition(
            f"the {exc.header} header for {target.provider} has characters an HTTP header cannot carry",
            metadata={"provider": target.provider, "header": exc.header},
        )
    if isinstance(exc, ForbiddenAddressError):
        # The name resolved to a metadata or link-local address at connect time: never retried.
        return EndpointNotAllowed(
            f"{target.provider} endpoint resolves only to addresses the gateway never calls",
            metadata={"provider": target.provider},
        )
    return connection_error(exc, provider=target.provider, scrub=options.scrub)


def _timed_out(options: CallOptions, target: UpstreamTarget) -> GatewayError:
    if options.deadline.at is not None:
        return DeadlineExceeded(
            f"{target.provider} did not answer within the caller's deadline",
            metadata={"provider": target.provider},
        )
    return UpstreamUnavailable(
        f"{target.provider} did not answer within {options.default_timeout:g} s",
        metadata={"provider": target.provider, "timeout_seconds": options.default_timeout},
    )


def load_json_object(raw: bytes, *, provider: str, scrub: Callable[[str], str]) -> dict[str, Any]:
    """The answer as a JSON object, or UPSTREAM_BAD_RESPONSE (any dialect)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        snippet = scrubbed_prefix(raw, scrub, 200)
        raise UpstreamBadResponse(
            f"{provider} answered something that is not JSON: {snippet!r}",
            metadata={"provider": provider, "bytes": len(raw)},
        ) from exc
    if not isinstance(payload, dict):
        raise UpstreamBadResponse(
            f"{provider} answered JSON that is not an object", metadata={"provider": provider}
        )
    return payload


def parse_json_object(
    raw: bytes, *, provider: str, scrub: Callable[[str], str], retryable: bool = False
) -> dict[str, Any]:
    """The answer as a JSON object whose `choices` (if any) have a shape we can read.

    A body carrying an `error` object instead of choices raises its mapped error; with
    `retryable`, a 429/5xx code in it raises `RetryableError` so the call is retried.
    """
    payload = load_json_object(raw, provider=provider, scrub=scrub)
    if payload.get("error") and not payload.get("choices"):
        if retryable:
            raise body_error(payload, provider=provider, scrub=scrub)
        raise error_in_body(payload, provider=provider, scrub=scrub)
    check_shape(payload, provider=provider)
    return payload


# -- shape checks: an answer with values of the wrong type is a bad response, not a crash ------


def _bad_shape(provider: str, where: str) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"{provider} answered a value of the wrong type, or out of range, at {where}",
        metadata={"provider": provider, "field": where},
    )


def _is_int(value: object, limit: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit)


def _is_text(value: object) -> bool:
    return value is None or isinstance(value, str)


def _check_calls(calls: object, provider: str, where: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _bad_shape(provider, where)
    if len(calls) > MAX_TOOL_CALLS:
        raise too_many(provider, where, len(calls), MAX_TOOL_CALLS)
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise _bad_shape(provider, f"{where}[{i}]")
        if not _is_int(call.get("index"), MAX_TOOL_CALLS - 1):
            raise _bad_shape(provider, f"{where}[{i}].index")
        if not _is_text(call.get("id")):
            raise _bad_shape(provider, f"{where}[{i}]")
        function = call.get("function")
        if function is None:
            continue
        if (
            not isinstance(function, dict)
            or not _is_text(function.get("name"))
            or not _is_text(function.get("arguments"))
        ):
            raise _bad_shape(provider, f"{where}[{i}].function")


_MESSAGE_TEXT_KEYS = ("reasoning_content", "reasoning", "role", "refusal")


def _check_message(message: object, provider: str, where: str) -> None:
    # Runs for every chunk of every stream: the common case (fields absent or str) is tested
    # inline, and the names of the places are built only for an error.
    if message is None:
        return
    if not isinstance(message, dict):
        raise _bad_shape(provider, where)
    get = message.get
    content = get("content")
    if (
        content is not None
        and not isinstance(content, str)
        and not (
            isinstance(content, list)
            and all(isinstance(p, dict) and _is_text(p.get("text")) for p in content)
        )
    ):
        raise _bad_shape(provider, f"{where}.content")
    for key in _MESSAGE_TEXT_KEYS:
        value = get(key)
        if value is not None and not isinstance(value, str):
            raise _bad_shape(provider, f"{where}.{key}")
    calls = get("tool_calls")
    if calls is not None:
        _check_calls(calls, provider, f"{where}.tool_calls")
    legacy = get("function_call")
    if legacy is not None and (
        not isinstance(legacy, dict)
        or not _is_text(legacy.get("name"))
        or not _is_text(legacy.get("arguments"))
    ):
        raise _bad_shape(provider, f"{where}.function_call")
    # Walked by the answer cap and both converters (a block that is not a dict is skipped there).
    blocks = get("thinking_blocks")
    if blocks is not None and not isinstance(blocks, list):
        raise _bad_shape(provider, f"{where}.thinking_blocks")


# Every count `usage_from_json` reads: each becomes an int32 field of `Usage` (the cache writes
# are set by Anthropic's translator, but any upstream's usage may carry them).
_USAGE_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_cache_hit_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
)
_USAGE_DETAILS = (
    ("prompt_tokens_details", "cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens"),
)


def _check_usage(usage: object, provider: str) -> None:
    if usage is None:
        return
    if not isinstance(usage, dict):
        raise _bad_shape(provider, "usage")
    # Runs for every answer: the usual count (absent, or a plain int in range) is tested
    # inline, anything else by `_is_int`, which decides.
    get = usage.get
    for key in _USAGE_COUNTS:
        value = get(key)
        if (
            value is not None
            and not (type(value) is int and 0 <= value <= _INT32_MAX)
            and not _is_int(value, _INT32_MAX)
        ):
            raise _bad_shape(provider, f"usage.{key}")
    # No total (or 0): `usage_from_json` reports prompt + completion, which two counts in range
    # can take past what the field holds.
    if not get("total_tokens") and (get("prompt_tokens") or 0) + (get("completion_tokens") or 0) > _INT32_MAX:
        raise _bad_shape(provider, "usage.total_tokens")
    for details, key in _USAGE_DETAILS:
        part = get(details)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise _bad_shape(provider, f"usage.{details}")
        value = part.get(key)
        if (
            value is not None
            and not (type(value) is int and 0 <= value <= _INT32_MAX)
            and not _is_int(value, _INT32_MAX)
        ):
            raise _bad_shape(provider, f"usage.{details}")


def check_shape(payload: dict[str, Any], *, provider: str) -> None:
    """Refuse a completion or chunk whose known fields have types no converter can read.

    Covers chat completions (`message`), chat chunks (`delta`) and text completions (`text`);
    unknown fields are left alone.
    """
    choices = payload.get("choices")
    if type(choices) is list and len(choices) == 1 and type(choice := choices[0]) is dict:
        # The usual chunk: one choice whose delta is text content alone, tested inline (no
        # helper calls, no loop); the usual unary answer: one choice with a message and no
        # delta, its message checked as the loop would. Anything else goes through the loop.
        get = choice.get
        index, finish, delta = get("index"), get("finish_reason"), get("delta")
        if (index is None or (type(index) is int and 0 <= index < MAX_CHOICES)) and (
            finish is None or type(finish) is str
        ):
            if (
                type(delta) is dict
                and len(delta) == 1
                and type(delta.get("content")) is str
                and get("text") is None
                and get("message") is None
            ):
                choices = None
            elif delta is None and get("text") is None and type(message := get("message")) is dict:
                _check_message(message, provider, "choices[0].message")
                choices = None
    if choices is not None:
        if not isinstance(choices, list):
            raise _bad_shape(provider, "choices")
        if len(choices) > MAX_CHOICES:
            raise too_many(provider, "choices", len(choices), MAX_CHOICES)
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _bad_shape(provider, f"choices[{i}]")
            get = choice.get
            index = get("index")
            if index is not None and not _is_int(index, MAX_CHOICES - 1):
                raise _bad_shape(provider, f"choices[{i}].index")
            finish, text = get("finish_reason"), get("text")
            if (finish is not None and not isinstance(finish, str)) or (
                text is not None and not isinstance(text, str)
            ):
                raise _bad_shape(provider, f"choices[{i}]")
            message = get("message")
            if message is not None:
                _check_message(message, provider, f"choices[{i}].message")
            delta = get("delta")
            if delta is not None:
                _check_message(delta, provider, f"choices[{i}].delta")
    created = payload.get("created")
    if (
        created is not None
        and not (type(created) is int and 0 <= created <= _INT64_MAX)  # the usual value: no call
        and not _is_int(created, _INT64_MAX)
        and not (isinstance(created, float) and 0 <= created <= 2**62)
    ):
        raise _bad_shape(provider, "created")
    usage = payload.get("usage")
    if usage is not None:
        _check_usage(usage, provider)


class ShapeChecked:
    """A translating dialect's decoder whose chunks get the OpenAI path's `check_shape` (usage
    inside int32, at most MAX_TOOL_CALLS calls per chunk, ...): what reaches the accumulator and
    the proto conversion is held to the same rules whichever provider answered."""

    __slots__ = ("_inner", "_provider")

    def __init__(self, inner: StreamDecoder, *, provider: str) -> None:
        self._inner = inner
        self._provider = provider

    def _checked(self, chunks: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
        for chunk in chunks:
            if chunk is not None:
                check_shape(chunk, provider=self._provider)
        return chunks

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]:
        return self._checked(self._inner.feed(event, data))

    def finish(self) -> list[dict[str, Any] | None]:
        return self._checked(self._inner.finish())


def checked_completion(completion: dict[str, Any], *, provider: str) -> dict[str, Any]:
    """A translated unary answer, held to the OpenAI path's shape rules (see ShapeChecked)."""
    check_shape(completion, provider=provider)
    return completion


# -- streams -------------------------------------------------------------------------------


_END = object()


@dataclass(slots=True)
class _Primed:
    """The first event of an SSE answer, read inside the retry loop, and the parser to go on with."""

    events: AsyncIterator[dict[str, Any] | None]
    first: object  # dict, None for [DONE], or _END for an empty stream


# The first SSE event read by `open_stream` rides on the response itself (`reader_state`, so it
# lives and dies with it) and `sse_events` picks it up there: callers handle a plain response.


async def open_stream(
    client: HttpClient,
    target: UpstreamTarget,
    url: str,
    body: bytes,
    options: CallOptions,
    *,
    dialect: Provider = OPENAI,
    model: str = "",
) -> Response:
    """Open a streamed answer (retries included); the caller must release or close the response.

    `dialect` classifies error statuses and decodes the events (a new decoder per attempt).

    For an SSE answer (`text/event-stream`) the first event is read here, so everything before
    it is retried like a unary call: an error status, a refused or reset connection, a stream
    that breaks before its first event, a first event that is an `error` with a 429/5xx code.
    Once `open_stream` returned, nothing is retried: the first event may be relayed at once.
    """

    async def attempt() -> Response:
        try:
            response = await client.post(
                url,
                body,
                target.headers,
                options.timeout(stream=True),
                private_ok=target.private_ok,
                fixed=_SSE_HEADERS,
            )
        except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
            raise transport_error(exc, options, target) from exc
        try:
            status = response.status or 0
            if status >= 300:
                raw = await _read_error_body(response)
                raise errors.keep_error_body(
                    dialect.error_for_status(
                        status, raw, response.headers, provider=target.provider, scrub=options.scrub
                    ),
                    status,
                    raw,
                    options.scrub,
                )
            if response.content_type in ("application/json", "text/html"):
                # The upstream ignored `stream`, or answered an error object or page with a 200.
                raw = await _read_error_body(response)
                parse_json_object(raw, provider=target.provider, scrub=options.scrub, retryable=True)
                raise UpstreamBadResponse(
                    f"{target.provider} answered {response.content_type} instead of a stream",
                    metadata={"provider": target.provider, "content_type": response.content_type},
                )
            upstream_kind.learn(target.base_url, response.headers)  # llama-server's?
            if response.content_type == "text/event-stream":
                decoder = dialect.stream_decoder(provider=target.provider, model=model, scrub=options.scrub)
                events = _iter_events(
                    response, provider=target.provider, scrub=options.scrub, decoder=decoder
                )
                try:
                    first = await anext(events, _END)
                except TimeoutError as exc:
                    raise _read_timed_out(exc, options, target) from exc
                except OSError as exc:
                    raise connection_error(exc, provider=target.provider, scrub=options.scrub) from exc
                except (RateLimitExceeded, UpstreamUnavailable) as exc:  # an error event; nothing relayed yet
                    if exc.final:  # e.g. a request alone over the per-minute token limit, a used-up quota
                        raise
                    raise RetryableError(
                        exc, status=_http_status(exc), retry_after=exc.upstream_retry_after
                    ) from exc
                response.reader_state = _Primed(events, first)
        except BaseException:
            response.close()
            raise
        return response

    return await call_with_retries(
        attempt, settings=options.retry, deadline=options.deadline, on_retry=options.on_retry
    )


async def _read_error_body(response: Response) -> bytes:
    try:
        return await response.read(1024 * 1024)
    except TimeoutError:
        raise
    except (OSError, BodyTooLargeError):
        return b""


def _http_status(error: GatewayError) -> int:
    # An error event carries its code as `upstream_code` (the HTTP status was 200): retry by it.
    try:
        return int(error.metadata.get("upstream_code") or error.metadata.get("http_status", "0"))
    except ValueError:
        return 0


def _read_timed_out(exc: BaseException, options: CallOptions, target: UpstreamTarget) -> GatewayError:
    if isinstance(exc, IdleTimeoutError) or options.deadline.at is None:
        return UpstreamUnavailable(
            f"{target.provider} sent nothing for {options.default_timeout:g} s",
            metadata={"provider": target.provider, "timeout_seconds": options.default_timeout},
        )
    return DeadlineExceeded(
        f"{target.provider} did not finish within the caller's deadline",
        metadata={"provider": target.provider},
    )


async def _resume(primed: _Primed) -> AsyncIterator[dict[str, Any] | None]:
    if primed.first is _END:
        return
    yield primed.first  # type: ignore[misc]
    if primed.first is None:
        return
    async for event in primed.events:
        yield event


@contextlib.contextmanager
def released_when_done(response: Response) -> Iterator[Response]:
    """Return a fully read stream's connection to the pool; close one abandoned half-way.

    An abandoned stream's upstream may still be sending: only closing the connection stops it.
    """
    try:
        yield response
    except BaseException:
        response.close()
        raise
    response.release()


async def sse_events(
    response: Response, *, provider: str, scrub: Callable[[str], str]
) -> AsyncIterator[dict[str, Any] | None]:
    """Yield each SSE event's chunk; None once for the end (`[DONE]`).

    The events are decoded by the decoder `open_stream` chose (OpenAI's for a response it did
    not open).

    Keep-alive comments (`: ...`), `event:`/`id:`/`retry:` fields and blank lines are skipped;
    multi-line `data:` fields are joined with newlines as the SSE spec says. A broken connection
    is UPSTREAM_UNAVAILABLE, an upstream that goes silent past the read timeout too, and the
    caller's deadline passing mid-stream DEADLINE_EXCEEDED.
    """
    primed = response.reader_state
    if not isinstance(primed, _Primed):
        primed = None
    response.reader_state = None
    events = _iter_events(response, provider=provider, scrub=scrub) if primed is None else _resume(primed)
    try:
        async for event in events:
            yield event
    except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
        raise broken_stream(exc, provider, scrub) from exc


async def sse_batches(
    response: Response, *, provider: str, scrub: Callable[[str], str]
) -> AsyncIterator[list[dict[str, Any] | None]]:
    """`sse_events`, but the chunks of every event that arrived in one network read together,
    as one list (the decoder `open_stream` chose; OpenAI's for a response it did not open).

    Nothing waits for more data: each list holds what one read completed (never empty; a None
    for `[DONE]` ends the last one). An event that fails to parse ends the stream with its error
    after the events before it were handed out, exactly as `sse_events` would.
    """
    primed = response.reader_state
    if not isinstance(primed, _Primed):
        primed = None
    response.reader_state = None
    try:
        if primed is None:
            parser = _iter_events(response, provider=provider, scrub=scrub)
        elif primed.first is _END:
            return
        elif primed.first is None or not isinstance(primed.events, _SSEParser):
            async for event in _resume(primed):
                yield [event]
            return
        else:
            parser = primed.events
            # Relayed once: not kept (by `primed`) for the rest of a held stream.
            first, primed = primed.first, None
            yield [first, *parser.take_pending()]  # type: ignore[list-item]
            del first
        while batch := await parser.next_batch():
            yield batch
    except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
        raise broken_stream(exc, provider, scrub) from exc


def sse_batch_reader(
    response: Response, *, provider: str, scrub: Callable[[str], str]
) -> Callable[[], Awaitable[list[dict[str, Any] | None]]]:
    """`sse_batches` as a function awaited for each batch ([] at the end), with the same
    batches and errors: the parser's own `next_batch` where `sse_batches` would read from it
    (one async-generator layer fewer for every read of the stream), else that generator."""
    primed = response.reader_state
    parser: _SSEParser | None = None
    if not isinstance(primed, _Primed):
        parser = _iter_events(response, provider=provider, scrub=scrub)
    elif primed.first is not _END and primed.first is not None and isinstance(primed.events, _SSEParser):
        parser = primed.events
        # The first event handed out first, with the rest of its read, as sse_batches does.
        parser._pending, parser._taken = [primed.first, *parser.take_pending()], 0  # type: ignore[list-item]
    if parser is not None:
        response.reader_state = None  # (the first event is not kept past its batch)
        parser._broken = (provider, scrub)
        return parser.next_batch
    batches = sse_batches(response, provider=provider, scrub=scrub)
    return lambda: anext(batches, [])


def broken_stream(exc: BaseException, provider: str, scrub: Callable[[str], str]) -> GatewayError:
    """What a transport error in the middle of a stream means for the caller."""
    if isinstance(exc, IdleTimeoutError):
        return UpstreamUnavailable(
            f"{provider} stopped sending in the middle of the stream",
            metadata={"provider": provider, "error_type": type(exc).__name__},
        )
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(
            f"{provider} did not finish within the caller's deadline", metadata={"provider": provider}
        )
    if isinstance(exc, InvalidResponseError):  # broken framing: unreadable, as before the first event
        return UpstreamBadResponse(
            f"{provider} broke the stream's HTTP framing: {scrub(str(exc))}",
            metadata={"provider": provider, "error_type": type(exc).__name__},
        )
    return UpstreamUnavailable(
        f"{provider} broke the stream: {scrub(str(exc)) or type(exc).__name__}",
        metadata={"provider": provider, "error_type": type(exc).__name__},
    )


def _iter_events(
    response: Response, *, provider: str, scrub: Callable[[str], str], decoder: StreamDecoder | None = None
) -> _SSEParser:
    """The SSE parser; transport exceptions pass through unchanged (callers translate them)."""
    if decoder is None:
        decoder = OpenAIStreamDecoder(provider=provider, scrub=scrub)
    return _SSEParser(response, provider=provider, decoder=decoder)


_BOM = b"\xef\xbb\xbf"


def event_too_large(provider: str) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"{provider} sent a stream event over {MAX_EVENT_BYTES} bytes",
        metadata={"provider": provider, "limit_bytes": MAX_EVENT_BYTES},
    )


class LineReader:
    """The complete lines of a byte stream, in time linear in its size.

    A line ends at LF, CRLF or a lone CR (the SSE rule; NDJSON never has a raw CR, as JSON
    escapes it). The unfinished last line is kept as a list of pieces, and only each new piece
    is searched for a line end: re-joining and re-splitting the whole buffer on every read made
    one 16 MiB line in 64 KiB reads cost 2.6 s of CPU. `held` is the size of that unfinished line,
    for the caller's cap. Every `_FOLD` pieces of it are joined into one block: a line arriving a
    few bytes per read held a bytes object (~40 bytes of overhead) per read, 20 times its size.
    """

    __slots__ = ("_partial", "_folded", "held", "_after_cr")

    _FOLD = 256

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._folded = 0  # the first `_folded` entries of `_partial` are joined blocks
        self.held = 0
        self._after_cr = False  # the last piece ended with CR: an LF opening the next one is its pair

    def feed(self, piece: bytes) -> list[bytes]:
        """The lines this piece completes (without their line ends), in order."""
        if self._after_cr:
            self._after_cr = False
            if piece.startswith(b"\n"):
                piece = piece[1:]
        if b"\r" in piece:
            self._after_cr = piece.endswith(b"\r")
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = piece.split(b"\n")
        tail = lines.pop()
        partial = self._partial
        if not lines:  # no line end: hold the piece (split handed back the same object, no copy)
            if tail:
                partial.append(tail)
                self.held += len(tail)
                folded = self._folded
                if len(partial) - folded >= self._FOLD:
                    block = b"".join(partial[folded:])
                    del partial[folded:]
                    partial.append(block)
                    self._folded = folded + 1
            return lines
        if partial:
            partial.append(lines[0])
            lines[0] = b"".join(partial)
            partial.clear()
            self._folded = 0
            self.held = 0
        if tail:  # the usual read ends at an event's end: nothing to hold
            partial.append(tail)
            self.held = len(tail)
        return lines

    @property
    def at_line_start(self) -> bool:
        """Nothing is held: the next piece starts a line (and no LF of it pairs a CR before)."""
        return not self._partial and not self._after_cr

    def rest(self) -> bytes:
        """The unfinished last line, at the end of the stream."""
        rest = b"".join(self._partial)
        self._partial = []
        self._folded = 0
        self.held = 0
        return rest


class _SSEParser:
    """SSE events of one response, one at a time (`async for`) or a network read at a time
    (`next_batch`). Transport exceptions pass through unchanged (callers translate them).

    Each read is parsed whole: its complete events (their `event:` name and joined `data:`) are
    handed to the decoder and the chunks kept until handed out. An error found on the way (an
    event the decoder refuses, an `error` event, an oversized event) is kept too and raised once
    the chunks before it were handed out, so callers see the same sequence as with an
    event-by-event parser.
    """

    __slots__ = (
        "_response",
        "_provider",
        "_decoder",
        "_lines",
        "_event_name",
        "_data_lines",
        "_data_size",
        "_pending",
        "_taken",
        "_error",
        "_ended",
        "_bom",
        "_idle",
        "_last_event",
        "_broken",
    )

    def __init__(self, response: Response, *, provider: str, decoder: StreamDecoder) -> None:
        self._response = response
        self._provider = provider
        self._decoder = decoder
        self._lines = LineReader()
        self._event_name: str | None = None  # the `event:` field of the event being read
        self._data_lines: list[bytes] = []
        self._data_size = 0
        self._pending: list[dict[str, Any] | None] = []  # decoded, not handed out yet
        # How many of `_pending` `__anext__` handed out: an index, as list.pop(0) per event was
        # quadratic in the events of one read (a compressed body inflates 4 MiB per read).
        self._taken = 0
        self._error: Exception | None = None  # raised after the pending events
        self._ended = False  # `[DONE]`, the end of the body, or an error: read no more
        self._bom = True  # the first line is still to come: the SSE spec ignores a BOM opening it
        # Without a caller deadline reads are bounded by the idle timeout, but keep-alive comments
        # are bytes: they alone must not hold a call longer than that bound either.
        self._idle: float | None = getattr(response, "idle_timeout", None)
        self._last_event = time.monotonic()
        # Set by sse_batch_reader: a transport error is then what it means mid-stream
        # (broken_stream), as sse_batches makes it; before that it passes through unchanged.
        self._broken: tuple[str, Callable[[str], str]] | None = None

    def __aiter__(self) -> _SSEParser:
        return self

    async def __anext__(self) -> dict[str, Any] | None:
        if self._taken >= len(self._pending):
            batch = await self.next_batch()
            if not batch:
                raise StopAsyncIteration
            self._pending, self._taken = batch, 0
        event = self._pending[self._taken]
        self._taken += 1
        return event

    def take_pending(self) -> list[dict[str, Any] | None]:
        """The events of the last read not handed out yet."""
        pending = self._pending[self._taken :] if self._taken else self._pending
        self._pending, self._taken = [], 0
        return pending

    async def next_batch(self) -> list[dict[str, Any] | None]:
        """The events not handed out yet, or else every event the next read completes; [] at the end."""
        if self._pending:
            if self._taken < len(self._pending):
                return self.take_pending()
            self._pending, self._taken = [], 0
        try:
            while True:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._ended:
                    return []
                piece = await self._response.read_chunk()
                if not piece:
                    self._ended = True
                    return self._tail()
                batch = self._feed(piece)
                idle = self._idle
                if batch:
                    if idle is not None:
                        self._last_event = time.monotonic()
                    return batch
                if idle is not None and time.monotonic() - self._last_event >= idle:
                    self._ended = True
                    raise UpstreamUnavailable(
                        f"{self._provider} sent only keep-alive comments for {idle:g} s",
                        metadata={"provider": self._provider},
                    )
        except OSError as exc:  # TimeoutError and HttpClientError are OSErrors
            if self._broken is None:
                raise
            raise broken_stream(exc, *self._broken) from exc

    def _feed(self, piece: bytes) -> list[dict[str, Any] | None]:
        # The usual read is exactly one event, `data: {...}` and a blank line, at a line start
        # with no event begun: its data is the piece without the prefix and the two LFs (what
        # the line loop below would find, without splitting it or keeping state). Its first LF
        # is followed by one more and nothing else; partition and removeprefix take one
        # argument (no PyArg_ParseTuple, as startswith, find and endswith do: every chunk).
        line, _, rest = piece.partition(b"\n")
        if (
            rest == b"\n"
            and 13 not in line  # no CR (an int: memchr, where b"\r" is a substring search)
            and len(data := line.removeprefix(b"data: ")) == len(line) - 6
            and not self._data_lines
            and len(data) <= MAX_EVENT_BYTES
            and self._lines.at_line_start
        ):
            self._bom = False
            name, self._event_name = self._event_name, None
            try:
                chunks = self._decoder.feed(name, data)
            except Exception:
                self._ended = True
                raise
            if chunks and chunks[-1] is None:
                self._ended = True
            return chunks
        return self._feed_lines(piece)

    def _feed_lines(self, piece: bytes) -> list[dict[str, Any] | None]:
        events: list[dict[str, Any] | None] = []
        data_lines = self._data_lines
        feed = self._decoder.feed
        try:
            lines = self._lines.feed(piece)
            if self._bom and lines:
                self._bom = False
                lines[0] = lines[0].removeprefix(_BOM)
            for line in lines:
                if not line:
                    if data_lines:
                        data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
                        chunks = feed(self._event_name, data)
                        data_lines = self._data_lines = []
                        self._data_size = 0
                        self._event_name = None
                        if chunks:
                            events += chunks
                            if chunks[-1] is None:
                                self._ended = True
                                break
                    else:
                        self._event_name = None  # an event without data is not dispatched
                    continue
                if line.startswith(b"data:"):
                    value = line[5:]
                    value = value[1:] if value.startswith(b" ") else value
                    self._data_size += len(value)
                    if self._data_size > MAX_EVENT_BYTES:
                        raise event_too_large(self._provider)
                    data_lines.append(value)
                elif line.startswith(b"event:"):
                    name = line[6:]
                    self._event_name = (name[1:] if name.startswith(b" ") else name).decode(
                        "utf-8", "replace"
                    )
                # Comments (":") and other fields are ignored.
            held = self._lines.held
            # The held line still has its "data: " prefix (6 bytes), which the cap does not count.
            if held and self._data_size + held > MAX_EVENT_BYTES + 6 and not self._ended:
                # An unfinished line (data or not) that is already over the cap: stop reading.
                raise event_too_large(self._provider)
        except Exception as exc:
            self._ended = True
            if not events:
                raise
            self._error = exc
        return events

    def _tail(self) -> list[dict[str, Any] | None]:
        """The end of the body: an event cut off without its blank line, then the decoder's rest."""
        tail = self._lines.rest()
        if self._bom:
            tail = tail.removeprefix(_BOM)
        data_lines = self._data_lines
        if tail.startswith(b"data:"):
            value = tail[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
        chunks: list[dict[str, Any] | None] = []
        if data_lines:
            chunks += self._decoder.feed(self._event_name, b"\n".join(data_lines))
            if chunks and chunks[-1] is None:
                return chunks
        return chunks + self._decoder.finish()


def _decode_event(data: bytes, provider: str, scrub: Callable[[str], str]) -> dict[str, Any] | None:
    """One OpenAI SSE event's data: its chunk, None for `[DONE]`; an error event raises."""
    if not data.endswith(b"}") and data.strip() == b"[DONE]":  # (a chunk ends with its brace)
        return None
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamBadResponse(
            f"{provider} sent an SSE event that is not JSON: {scrubbed_prefix(data, scrub, 200)!r}",
            metadata={"provider": provider},
        ) from exc
    if not isinstance(event, dict):
        raise UpstreamBadResponse(
            f"{provider} sent an SSE event that is not an object", metadata={"provider": provider}
        )
    if event.get("error"):
        raise error_in_body(event, provider=provider, scrub=scrub)
    if event.get("object") == "error":  # vLLM and some proxies: {"object": "error", "message": ...}
        raise error_in_body({"error": event}, provider=provider, scrub=scrub)
    check_shape(event, provider=provider)
    return event
