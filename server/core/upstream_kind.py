"""Which OpenAI-compatible base URLs are llama.cpp's `llama-server`, learned from its answers.

llama-server ignores an object `tool_choice` and `parallel_tool_calls: false` (see
`server.core.tools.takes_named_tool_choice`), so the gateway sends it a forced call in the form
it honours. Recognizing it by a name in the handle or model ("llamacpp/...") misses every
deployment not named so; what it sends is a fact: each of its answers carries the header
`Server: llama.cpp`, and its JSON answers a `timings` object (`prompt_n`, `predicted_n`, ...)
that passes through a reverse proxy that rewrites `Server`. The first answer from a base URL
teaches it here; later calls to that base URL use the compatible form (a forced call that came
back without a call from a URL just learned is asked once more in that form, see
`server.core.tool_call_check.retry_form`).

Keyed by the base URL (not the host: one proxy may route paths to different servers), as a
16-byte digest, in a bounded LRU: what a base URL answered decides only how calls to that same
base URL are sent, and the compatible form asks for the same call, so a server lying about
what it is can only change how its own requests are shaped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

MAX_LEARNED = 4096
_learned: OrderedDict[bytes, None] = OrderedDict()


def _key(base_url: str) -> bytes:
    return hashlib.blake2b(base_url.rstrip("/").encode(), digest_size=16).digest()


def _remember(base_url: str) -> None:
    key = _key(base_url)
    if key in _learned:
        _learned.move_to_end(key)
        return
    _learned[key] = None
    if len(_learned) > MAX_LEARNED:
        _learned.popitem(last=False)


def says_llamacpp(headers: Mapping[str, str], answer: Mapping[str, Any] | None = None) -> bool:
    """The answer came from llama-server: its `Server` header (lower-case names), or a
    `timings` object of its shape in the JSON answer (a rewritten `Server` header)."""
    if headers.get("server", "").strip().lower().startswith("llama.cpp"):
        return True
    timings = answer.get("timings") if answer is not None else None
    return isinstance(timings, dict) and "predicted_n" in timings and "prompt_n" in timings


def learn(base_url: str, headers: Mapping[str, str], answer: Mapping[str, Any] | None = None) -> bool:
    """Remember `base_url` as llama-server's when its answer says so; True when it does."""
    if not base_url or not says_llamacpp(headers, answer):
        return False
    _remember(base_url)
    return True


def is_llamacpp(base_url: str) -> bool:
    """`base_url` answered as llama-server before (a dictionary lookup)."""
    return bool(base_url) and bool(_learned) and _key(base_url) in _learned


def forget_all() -> None:
    """Tests: start from nothing learned."""
    _learned.clear()
