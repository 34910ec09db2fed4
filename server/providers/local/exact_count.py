"""The exact prompt token count of a local server that exposes its tokenizer (opt-in).

`LLMGW_LOCAL_EXACT_TOKENS=true`: for llamacpp and vllm endpoints, the context-window guard counts
the rendered prompt with the server's own tokenizer instead of tiktoken (cl100k undercounts these
models badly: 125 tokens where llama.cpp counted 155 for the same wrapper prompt).

- llama.cpp: `POST {base}/tokenize {"content", "add_special", "parse_special": true}` ->
  `{"tokens": [...]}` (add_special only for the prompt's start: the BOS the completion adds).
- vLLM: `POST {root}/tokenize {"model", "prompt", "add_special_tokens"}` -> `{"count", ...}`
  (at the server root, not under /v1).

Cost: one extra loopback round trip before the completion (two requests, sent together).
Cached per prompt prefix: a prompt is cut at its last turn marker (`<|im_start|>`,
`<|start_header_id|>`); the count of the part before it is cached (bounded, CACHE_ENTRIES), and
the next step of the same conversation, which starts with that part, sends only what follows
the longest cached prefix. Counts add up across such a cut because both servers split a text at
special tokens before tokenizing the pieces. A failure of the tokenize call (an older server, a
404, a 5xx, no answer within TOKENIZE_SECONDS, an answer that is not a plausible count) falls back
to the tiktoken guard; the completion call then reports what is wrong. The tokenize call is asked
once (no retries) and waits at most TOKENIZE_SECONDS: it is an optimisation of the guard, and the
default upstream timeout and retry budget would hold a call for minutes behind a hung /tokenize.
A refused address (ENDPOINT_NOT_ALLOWED) and the caller's own deadline are not fallbacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections import OrderedDict
from typing import Any

import orjson

from server.core.retry import Deadline
from server.errors import (
    ContextWindowExceeded,
    DeadlineExceeded,
    EndpointNotAllowed,
    GatewayError,
    UpstreamBadResponse,
)
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient
from server.providers.openai_compat import CallOptions, post_json

log = logging.getLogger("llmgateway.local.exact_count")

SUPPORTED = frozenset({"llamacpp", "vllm"})
TURN_MARKERS = ("<|im_start|>", "<|start_header_id|>")
CACHE_ENTRIES = 4096
ENCODING = "server"  # CountTokens/metadata name of a count made by the server's tokenizer
# A loopback tokenize of a long prompt takes milliseconds; a server that has not answered by then
# is not going to help the guard.
TOKENIZE_SECONDS = 5.0
# A count above this many tokens per UTF-8 byte of the text (+ room for BOS/EOS and a prefix
# space) is a lie: byte-level BPE and byte-fallback SentencePiece give at most one per byte; the
# factor leaves room for normalizers that expand a character.
_MAX_TOKENS_PER_BYTE = 4
_SPECIAL_ROOM = 16


class PrefixCounts:
    """Token counts of prompt prefixes, by (endpoint, model, prefix digest); LRU, bounded."""

    def __init__(self, max_entries: int = CACHE_ENTRIES) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, int] = OrderedDict()

    def get(self, key: bytes) -> int | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: bytes, count: int) -> None:
        self._entries[key] = count
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


CACHE = PrefixCounts()


def boundaries(prompt: str) -> list[int]:
    """Offsets (> 0) where a turn marker starts, in order."""
    cuts: set[int] = set()
    for marker in TURN_MARKERS:
        start = prompt.find(marker, 1)
        while start > 0:
            cuts.add(start)
            start = prompt.find(marker, start + 1)
    return sorted(cuts)


def _prefix_keys(scope: bytes, prompt: str, cuts: list[int]) -> list[bytes]:
    """The cache key of prompt[:cut] for each cut (one pass of hashing over the prompt)."""
    digest = hashlib.blake2b(scope, digest_size=16)
    keys: list[bytes] = []
    start = 0
    for cut in cuts:
        digest.update(prompt[start:cut].encode())
        keys.append(digest.copy().digest())
        start = cut
    return keys


async def count_prompt(
    http: HttpClient,
    target: UpstreamTarget,
    endpoint_type: str,
    model: str,
    prompt: str,
    options: CallOptions,
    cache: PrefixCounts = CACHE,
    *,
    organization: str = "",
) -> int | None:
    """The server's count of `prompt` (BOS included), or None when the server could not count."""
    # Per organization: a cached prefix answers faster, so a shared cache would let one tenant
    # time its calls to learn whether another recently sent the same prompt prefix.
    scope = orjson.dumps([organization, target.base_url, endpoint_type, model])
    cuts = boundaries(prompt)
    keys = _prefix_keys(scope, prompt, cuts)
    known, start = 0, 0
    for i in range(len(cuts) - 1, -1, -1):
        found = cache.get(keys[i])
        if found is not None:
            known, start = found, cuts[i]
            break
    last = cuts[-1] if cuts else 0
    pieces: list[tuple[str, bool]] = []
    if start < last:
        pieces.append((prompt[start:last], start == 0))
    pieces.append((prompt[max(start, last) :], max(start, last) == 0))
    bounded = _tokenize_options(options)
    try:
        counts = await asyncio.gather(
            *(_tokenize(http, target, endpoint_type, model, text, first, bounded) for text, first in pieces)
        )
    except EndpointNotAllowed:
        raise  # the completion would be refused too: say so once, not after a tiktoken count
    except DeadlineExceeded as exc:
        remaining = options.deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise  # the caller's deadline passed, not only the tokenize bound
        log.warning(
            "%s did not count the prompt in time (%s); the tiktoken guard counts it", target.provider, exc
        )
        return None
    except GatewayError as exc:
        log.warning("%s could not count the prompt (%s); the tiktoken guard counts it", target.provider, exc)
        return None
    if start < last:
        cache.put(keys[cuts.index(last)], known + counts[0])
    return known + sum(counts)


def _tokenize_options(options: CallOptions) -> CallOptions:
    """One attempt, within TOKENIZE_SECONDS and the caller's deadline."""
    remaining = options.deadline.remaining()
    seconds = TOKENIZE_SECONDS if remaining is None else min(remaining, TOKENIZE_SECONDS)
    return dataclasses.replace(
        options,
        deadline=Deadline.after(seconds),
        retry=dataclasses.replace(options.retry, max_attempts=1),
        default_timeout=min(options.default_timeout, TOKENIZE_SECONDS),
        on_retry=None,
    )


def plausible_count(value: object, text: str) -> int | None:
    """`value` when it can be the token count of `text` (an int, not a bool, at least 1, at most
    _MAX_TOKENS_PER_BYTE per UTF-8 byte + _SPECIAL_ROOM), else None: a negative or zero count would
    let any prompt past the guard, a huge one refuse every prompt."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    if value < 1 or value > len(text.encode("utf-8", "surrogatepass")) * _MAX_TOKENS_PER_BYTE + _SPECIAL_ROOM:
        return None
    return value


def check_window(count: int, window: int, *, provider: str) -> None:
    """CONTEXT_WINDOW_EXCEEDED when the server's count does not fit the caller's window."""
    if 0 < window < count:
        raise ContextWindowExceeded(
            f"Request exceeds maximum context length ({count} > {window} tokens, counted by {provider})",
            metadata={
                "prompt_tokens": count,
                "total_tokens": count,
                "context_window": window,
                "encoding": ENCODING,
                "provider": provider,
            },
        )


async def _tokenize(
    http: HttpClient,
    target: UpstreamTarget,
    endpoint_type: str,
    model: str,
    text: str,
    first: bool,
    options: CallOptions,
) -> int:
    if not text:
        return 0
    base = target.base_url.rstrip("/")
    body: dict[str, Any]
    if endpoint_type == "vllm":
        url = base.removesuffix("/v1") + "/tokenize"
        body = {"model": model, "prompt": text, "add_special_tokens": first}
    else:
        url = base + "/tokenize"
        body = {"content": text, "add_special": first, "parse_special": True}
    _, answer = await post_json(http, target, url, orjson.dumps(body), options)
    if "count" in answer:  # vLLM
        found = plausible_count(answer["count"], text)
    else:  # llama.cpp: the token ids
        tokens = answer.get("tokens")
        found = plausible_count(len(tokens), text) if isinstance(tokens, list) else None
    if found is None:
        raise UpstreamBadResponse(
            f"{target.provider} answered /tokenize without a plausible token count",
            metadata={"provider": target.provider},
        )
    return found
