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
404) falls back to the tiktoken guard; the completion call then reports what is wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import Any

import orjson

from server.errors import ContextWindowExceeded, DeadlineExceeded, GatewayError, UpstreamBadResponse
from server.providers.base import UpstreamTarget
from server.providers.http import HttpClient
from server.providers.openai_compat import CallOptions, post_json

log = logging.getLogger("llmgateway.local.exact_count")

SUPPORTED = frozenset({"llamacpp", "vllm"})
TURN_MARKERS = ("<|im_start|>", "<|start_header_id|>")
CACHE_ENTRIES = 4096
ENCODING = "server"  # CountTokens/metadata name of a count made by the server's tokenizer


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
    try:
        counts = await asyncio.gather(
            *(_tokenize(http, target, endpoint_type, model, text, first, options) for text, first in pieces)
        )
    except DeadlineExceeded:
        raise
    except GatewayError as exc:
        log.warning("%s could not count the prompt (%s); the tiktoken guard counts it", target.provider, exc)
        return None
    if start < last:
        cache.put(keys[cuts.index(last)], known + counts[0])
    return known + sum(counts)


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
    count = answer.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    tokens = answer.get("tokens")
    if isinstance(tokens, list):
        return len(tokens)
    raise UpstreamBadResponse(
        f"{target.provider} answered /tokenize without tokens", metadata={"provider": target.provider}
    )
