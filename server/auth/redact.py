"""Scrubbing secrets from everything the gateway writes: traces, logs, errors, span attributes, answers.

A `Redactor` combines two nets:
  * the exact values it was told about: server keys and the encryption passphrase (`add`, kept
    for the life of the process) and BYOK keys as they are decrypted (`add_owned`, one entry per
    provider: replaced when the provider's key changes, dropped when the provider is deleted, and
    at most `MAX_SECRETS` of them, least recently used dropped first); each also in its
    URL-encoded and JSON-escaped spellings;
  * patterns for secrets it was not told about: gateway keys (`llmgw_<id>_<secret>`, so every
    gateway key is caught without registering each one), OpenAI-style `sk-...` and Google
    `AIza...` keys, `Authorization`/`api-key` header values, `Bearer` tokens, and URL query
    parameters such as `?key=`, `api_key=`, `token=`.

Answers (`redact_known`) get only the first net: a model may legitimately write `api_key=...` or
`Bearer <token>` in an answer, but never a key the server holds.

Known secrets are found without one search per secret: the text's UTF-8 bytes are sampled every
32 bytes (8-byte windows) and the samples that could be a window looked up in one dict of every
window a secret can present at a sample point (see `_Tier`); only a hit costs a substring check.
The cost depends on the text, not on the number of secrets. Values shorter than
`MIN_SECRET_LENGTH` are not registered: redacting every occurrence
of a 3-character "key" would shred the traces and protects nothing real.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from server.config import Settings
    from server.errors import GatewayError

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8
# BYOK keys kept at once (least recently used dropped first): bounds the index (~2.5 KB per key,
# so at most ~50 MiB).
# A dropped key is registered again by its provider's next call, before the call is sent.
MAX_SECRETS = 20_000

# JSON keys compared after lower-casing and mapping "-" to "_".
SENSITIVE_JSON_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "api_secret",
        "authorization",
        "proxy_authorization",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "secret_key",
        "secret",
        "password",
        "token",
        "bearer",
        "x_goog_api_key",
        "openai_api_key",
        "openrouter_api_key",
        "private_key",
        "encryption_key",
    }
)

# URL query parameters whose value is a credential.
_QUERY_NAMES = frozenset(
    {
        "key",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "token",
        "access_token",
        "access-token",
        "auth",
        "secret",
        "client_secret",
        "client-secret",
        "password",
        "sig",
        "signature",
    }
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


_API_KEY_NAMES = ("api-key", "api_key", "apikey")


@dataclass(frozen=True, slots=True)
class _Rule:
    """Redact group `secret` of `tail` matched right after each occurrence of a keyword.

    Finding keywords with `str.find` and matching a regex only there is far cheaper than running
    a case-insensitive alternation over the whole text (which costs ~20 ns per character); few,
    short keywords and a one-character `prefilter` (memchr speed) keep the common case cheap.
    """

    keywords: tuple[str, ...]
    tail: re.Pattern[str]
    ignore_case: bool = False  # keywords are lower case, searched in the lower-cased text
    keyword_is_secret: bool = False  # the keyword starts the secret (known key formats)
    word_boundary: bool = True  # the character before the name must not be a letter or digit
    prefilter: str = ""  # a character the text must contain for the rule to apply
    # The keyword ends a name ([a-z0-9_-]*keyword); the whole name must be in `names` (exact) or
    # end with one of `name_suffixes`, and, with `query`, follow `?`, `&` or `;` (or start the text).
    names: frozenset[str] = frozenset()
    name_suffixes: tuple[str, ...] = ()
    query: bool = False


_RULES: tuple[_Rule, ...] = (
    _Rule(
        ("llmgw_",), re.compile(r"[0-9a-f]{16}_[A-Za-z0-9_-]+"), keyword_is_secret=True, word_boundary=False
    ),
    _Rule(("sk-",), re.compile(r"[A-Za-z0-9_-]{20,}"), keyword_is_secret=True),
    _Rule(("AIza",), re.compile(r"[0-9A-Za-z_-]{30,}"), keyword_is_secret=True),
    _Rule(
        ("key=", "token=", "auth=", "secret=", "password=", "sig=", "signature="),
        re.compile(r"(?P<secret>[^&#\s\"'<>]+)"),
        ignore_case=True,
        word_boundary=False,
        prefilter="=",
        names=_QUERY_NAMES,
        query=True,
    ),
    _Rule(
        ("authorization", "key"),
        re.compile(
            r"['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|basic|token)\s+)?(?P<secret>[^\s'\",;{}\[\]()]+)",
            re.IGNORECASE,
        ),
        ignore_case=True,
        name_suffixes=("authorization", *_API_KEY_NAMES),
    ),
    _Rule(
        ("bearer",),
        re.compile(r"\s+(?P<secret>(?!\[REDACTED\])[A-Za-z0-9._~+/=-]{8,})"),
        ignore_case=True,
    ),
)


# By name, for `Redactor.redact` (which tests each one's keywords itself, in this order).
_GATEWAY_KEYS, _SK_KEYS, _GOOGLE_KEYS, _QUERY_PARAMS, _HEADER_VALUES, _BEARER_TOKENS = _RULES


def _aligned_lower(text: str) -> str:
    """`text` lower-cased character by character where lowering one changes the length (a rare
    non-ASCII case, such as "İ"): each position of the result is that of `text`."""
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _lower(text: str) -> str:
    """The haystack of the ignore_case rules: `text` lower-cased, aligned with it."""
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else _aligned_lower(text)


def _name_ok(rule: _Rule, text: str, haystack: str, start: int, after: int) -> bool:
    if not (rule.names or rule.name_suffixes):
        return not (rule.word_boundary and start > 0 and text[start - 1] in _WORD_CHARS)
    name_start = start
    while name_start > 0 and haystack[name_start - 1] in _NAME_CHARS:
        name_start -= 1
    name = haystack[name_start:after].rstrip("=")
    if rule.names and name not in rule.names:
        return False
    if rule.name_suffixes and not name.endswith(rule.name_suffixes):
        return False
    if rule.query:
        return name_start == 0 or text[name_start - 1] in "?&;"
    return not (rule.word_boundary and name_start > 0 and text[name_start - 1] in _WORD_CHARS)


def _apply(rule: _Rule, text: str, haystack: str) -> str:
    if rule.prefilter and rule.prefilter not in text:
        return text
    spans: list[tuple[int, int]] = []
    for keyword in rule.keywords:
        start = haystack.find(keyword)
        while start >= 0:
            after = start + len(keyword)
            # The anchored match is cheap C; the name check is Python, so it goes second.
            match = rule.tail.match(text, after)
            if match is not None and _name_ok(rule, text, haystack, start, after):
                spans.append((start, match.end()) if rule.keyword_is_secret else match.span("secret"))
            start = haystack.find(keyword, after)
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    last = 0
    for begin, end in spans:
        if begin < last:  # overlapping: already covered
            last = max(last, end)
            continue
        pieces.append(text[last:begin])
        pieces.append(REDACTED)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def _spellings(secret: str) -> set[str]:
    escaped = json.dumps(secret)[1:-1]
    forms = {secret, quote(secret, safe=""), quote(secret, safe="/"), escaped}
    # Other JSON encoders' spellings (only for keys with those characters): Go's encoding/json
    # escapes <, > and & (HTML-safe), PHP's json_encode escapes "/".
    if "<" in escaped or ">" in escaped or "&" in escaped:
        go = escaped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        forms.update((go, go.replace("/", "\\/")))
    if "/" in escaped:
        forms.add(escaped.replace("/", "\\/"))
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def _utf8(text: str) -> bytes:
    # Lone surrogates (from `errors="surrogateescape"` decoding) must not make scrubbing fail.
    return text.encode("utf-8", "surrogatepass")


# A stride of 32 bytes needs secrets of 39 bytes (most provider keys: OpenAI 51/164, Anthropic 108,
# OpenRouter 73, Groq 56); shorter ones go to denser tiers, paid for only when such secrets exist.
_TIERS: tuple[tuple[int, int], ...] = ((8, 32), (8, 16), (8, 8), (4, 4))  # (block bytes, stride bytes)


# Distinct 3-character heads of spellings up to which `Redactor.may_touch` searches for each.
_FEW_HEADS = 8
# With more heads, `may_touch` walks texts up to this long in Python (~20 us at worst); a longer
# one that has a character some spelling begins with gets True (the general path) without a look.
_WALK_CHARS = 128

# Candidate samples beyond which one C loop over every sample is cheaper than checking them one
# by one (text made of key characters, such as base64, makes nearly every sample a candidate).
_CANDIDATE_BUDGET = 256


class _Tier:
    """Spellings indexed by every `block`-byte window starting in their first `stride` bytes.

    The text is sampled at every `stride` bytes; an occurrence of a spelling of at least
    `stride + block - 1` bytes always contains one sample, which is one of its indexed windows.

    Most samples of ordinary text contain a byte no indexed window has (a space, a quote, a
    period): `bytes.translate` marks the bytes windows can have, big-int shifts AND each
    sample's marks together, and only the samples left marked are looked up. Looking every
    sample up costs a Python int and a dict probe (a cache miss with 10,000 keys) each: about
    twice as much, which stays the way for text made of key characters (base64).
    """

    __slots__ = ("block", "stride", "min_bytes", "windows", "fmt", "byte_refs", "table")

    def __init__(self, block: int, stride: int) -> None:
        self.block = block
        self.stride = stride
        self.min_bytes = stride + block - 1
        self.fmt: Literal["Q", "I"] = "Q" if block == 8 else "I"
        # Window -> the spelling (a plain str: almost every window belongs to one spelling, and
        # a tuple per window would cost ~15 MB per 10,000 keys) or a tuple of several.
        self.windows: dict[int, str | tuple[str, ...]] = {}
        self.byte_refs = [0] * 256  # byte value -> spellings of this tier that contain it
        # Translate table: 1 for those bytes, else 0. Immutable, replaced whole after `windows` has
        # the new spelling (never rebuilt lazily by a reader: a scan in another thread would cache
        # a table older than the last `add`, and miss that secret for good).
        self.table = bytes(256)

    def _new_table(self) -> None:
        self.table = bytes(1 if refs else 0 for refs in self.byte_refs)

    def keys_of(self, data: bytes) -> set[int]:
        keys: set[int] = set()
        for offset in range(self.stride):
            # Native order: the samples are read as native integers (memoryview.cast).
            keys.add(int.from_bytes(data[offset : offset + self.block], sys.byteorder))
        return keys

    def add(self, spelling: str, data: bytes) -> None:
        windows = self.windows
        for key in self.keys_of(data):
            present = windows.get(key)
            if present is None:
                windows[key] = spelling
            elif isinstance(present, str):
                windows[key] = (present, spelling)
            else:
                windows[key] = (*present, spelling)
        changed = False
        for byte in set(data):
            self.byte_refs[byte] += 1
            changed = changed or self.byte_refs[byte] == 1
        if changed:
            self._new_table()

    def remove(self, spelling: str, data: bytes) -> None:
        windows = self.windows
        for key in self.keys_of(data):
            present = windows.get(key)
            if present is None or present == spelling:
                windows.pop(key, None)
                continue
            rest = tuple(s for s in ((present,) if isinstance(present, str) else present) if s != spelling)
            if not rest:
                windows.pop(key, None)
            else:
                windows[key] = rest[0] if len(rest) == 1 else rest
        changed = False
        for byte in set(data):
            self.byte_refs[byte] -= 1
            changed = changed or self.byte_refs[byte] == 0
        if changed:
            self._new_table()

    def candidates(self, data: bytes, found: set[str]) -> None:
        block = self.block
        usable = len(data) - len(data) % block
        # Read once: `add`/`remove` (another thread) change `windows` in place, one atomic dict
        # operation at a time, and replace `table` whole after `windows` holds a new spelling.
        table = self.table
        windows = self.windows
        if usable < block or not windows:
            return
        samples = memoryview(data)[:usable].cast(self.fmt)[:: self.stride // block]
        sampled = samples.tobytes()
        # 1 per byte some window has, then each sample's bytes ANDed into its first byte, all in
        # big-int operations over the whole buffer (C loops, no object per sample).
        marks = int.from_bytes(sampled.translate(table), "little")
        width = 8
        while width < block * 8:
            marks &= marks >> width
            width *= 2
        selected = marks.to_bytes(len(sampled), "little")[::block]  # 1: this sample may be a window
        count = selected.count(1)
        if not count:
            return
        if count > _CANDIDATE_BUDGET:
            self._look_up_all(samples, found)
            return
        position = selected.find(1)
        while position >= 0:
            # .get: a log line redacted in another thread may race a provider being dropped.
            present = windows.get(samples[position])  # the sample as an int, no slice or copy
            if present is not None:
                if isinstance(present, str):
                    found.add(present)
                else:
                    found.update(present)
            position = selected.find(1, position + 1)

    def _look_up_all(self, samples: memoryview, found: set[str]) -> None:
        windows = self.windows
        if windows.keys().isdisjoint(samples):  # one C loop over every sample
            return
        for key in windows.keys() & set(samples):
            present = windows.get(key, ())
            if isinstance(present, str):
                found.add(present)
            else:
                found.update(present)


class Redactor:
    """Knows the secrets in play and scrubs them (and secret-looking values) from text and JSON.

    Scrubbing may run in any thread (the offload pool scrubs huge traces, handlers log) while the
    loop adds and drops secrets: changes are serialized by a lock (a lease may be released by the
    garbage collector in any thread), and a scan takes no lock: it reads each tier's immutable
    table once and the window dict one atomic lookup at a time, so it never raises and always
    finds every secret registered before it started.
    """

    def __init__(self, secrets: Iterable[str] = (), *, max_secrets: int = MAX_SECRETS) -> None:
        self._lock = threading.RLock()  # reentrant: a lease's __del__ may run inside a change
        self._max_owned = max_secrets
        self._pinned: set[str] = set()
        self._owned: OrderedDict[str, str] = OrderedDict()  # owner -> secret, least recent first
        self._refs: dict[str, int] = {}  # secret -> holders (pinned counts as one)
        self._spelling_refs: dict[str, int] = {}
        self._tiers = tuple(_Tier(block, stride) for block, stride in _TIERS)
        # For the stream scrubber: is a piece of text the start of a known spelling?
        self._sorted: list[str] = []
        self._heads: dict[str, int] = {}  # 1..3-character prefixes of spellings -> count
        self._lengths: dict[int, int] = {}  # spelling length -> count
        self._longest = 0
        self._shortest = 0  # the shortest spelling (0: none)
        self._firsts: dict[str, int] = {}  # first characters of spellings -> count
        # The distinct 3-character heads of spellings while there are at most _FEW_HEADS of them
        # (None: more), replaced whole on a change: `may_touch` searches the text for each.
        self._few_heads: tuple[str, ...] | None = ()
        self._head_kinds = 0  # distinct 3-character heads
        # Bumped after every change of the spellings redacted: text scrubbed and kept (the trace's
        # config copy, Gateway._config_json) is scrubbed again once the generation moved on, so a
        # secret learned later is never written from a copy made before it was known.
        self.generation = 0
        self.add_many(secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """A redactor that knows every server-held secret of the settings."""
        return cls(settings.secrets())

    def add(self, *secrets: str) -> None:
        """Register server-held secret values for good (empty and short ones are skipped; idempotent)."""
        self.add_many(secrets)

    def add_many(self, secrets: Iterable[str]) -> None:
        with self._lock:
            for secret in secrets:
                if _registrable(secret) and secret not in self._pinned:
                    self._pinned.add(secret)
                    self._retain(secret)

    def add_owned(self, owner: str, secret: str) -> None:
        """Register the secret of `owner` (a BYOK provider), replacing the one it had before.

        Cheap when unchanged (every call of a provider registers its key again, which also keeps
        it among the most recently used).
        """
        with self._lock:
            owned = self._owned
            if owned.get(owner) == secret:
                owned.move_to_end(owner)
                return
            self.discard_owner(owner)
            if not _registrable(secret):
                return
            owned[owner] = secret
            self._retain(secret)
            while len(owned) > self._max_owned:
                _, evicted = owned.popitem(last=False)
                self._release(evicted)

    def discard_owner(self, owner: str) -> None:
        """Forget the secret of `owner` (its provider was deleted); pinned values stay."""
        with self._lock:
            secret = self._owned.pop(owner, None)
            if secret is not None:
                self._release(secret)

    def _retain(self, secret: str) -> None:
        count = self._refs.get(secret, 0)
        self._refs[secret] = count + 1
        if count:
            return
        for spelling in _spellings(secret):
            refs = self._spelling_refs.get(spelling, 0)
            self._spelling_refs[spelling] = refs + 1
            if not refs:
                self._index(spelling)

    def _release(self, secret: str) -> None:
        count = self._refs.get(secret, 0) - 1
        if count > 0:
            self._refs[secret] = count
            return
        self._refs.pop(secret, None)
        for spelling in _spellings(secret):
            refs = self._spelling_refs.get(spelling, 0) - 1
            if refs > 0:
                self._spelling_refs[spelling] = refs
                continue
            self._spelling_refs.pop(spelling, None)
            self._unindex(spelling)

    def _tier_for(self, data: bytes) -> _Tier:
        for tier in self._tiers:
            if len(data) >= tier.min_bytes:
                return tier
        raise AssertionError("every registrable spelling fits the last tier")

    def _index(self, spelling: str) -> None:
        data = _utf8(spelling)
        self._tier_for(data).add(spelling, data)
        bisect.insort(self._sorted, spelling)
        for size in range(1, 4):
            head = spelling[:size]
            count = self._heads.get(head, 0)
            self._heads[head] = count + 1
            if size == 3 and not count:
                self._head_kinds += 1
                self._new_few_heads()
        self._lengths[len(spelling)] = self._lengths.get(len(spelling), 0) + 1
        self._longest = max(self._longest, len(spelling))
        self._shortest = min(self._shortest or len(spelling), len(spelling))
        self._firsts[spelling[0]] = self._firsts.get(spelling[0], 0) + 1
        self.generation += 1  # after the index changed: a reader of the new number sees it

    def _unindex(self, spelling: str) -> None:
        data = _utf8(spelling)
        self._tier_for(data).remove(spelling, data)
        position = bisect.bisect_left(self._sorted, spelling)
        if position < len(self._sorted) and self._sorted[position] == spelling:
            del self._sorted[position]
        for size in range(1, 4):
            head = spelling[:size]
            left = self._heads.get(head, 0) - 1
            if left > 0:
                self._heads[head] = left
            elif self._heads.pop(head, None) is not None and size == 3:
                self._head_kinds -= 1
                self._new_few_heads()
        left = self._lengths.get(len(spelling), 0) - 1
        if left > 0:
            self._lengths[len(spelling)] = left
        else:
            self._lengths.pop(len(spelling), None)
            self._longest = max(self._lengths, default=0)
            self._shortest = min(self._lengths, default=0)
        left = self._firsts.get(spelling[0], 0) - 1
        if left > 0:
            self._firsts[spelling[0]] = left
        else:
            self._firsts.pop(spelling[0], None)
        self.generation += 1

    def _new_few_heads(self) -> None:
        if self._head_kinds > _FEW_HEADS:
            self._few_heads = None
        else:  # few: a walk over the heads (3 per spelling) is short
            self._few_heads = tuple(head for head in self._heads if len(head) == 3)

    def __contains__(self, secret: str) -> bool:
        return secret in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def redact_known(self, text: str) -> str:
        """`text` with every known secret (in every spelling) replaced; no pattern rules."""
        if len(text) < MIN_SECRET_LENGTH or not self._spelling_refs:
            return text
        data = _utf8(text)
        found: set[str] = set()
        for tier in self._tiers:
            if len(data) >= tier.min_bytes:
                tier.candidates(data, found)
        if not found:
            return text
        # Longest first, so a secret containing another is replaced whole.
        for spelling in sorted(found, key=len, reverse=True):
            if spelling in text:
                text = text.replace(spelling, REDACTED)
        return text

    def known_in(self, text: str) -> list[str]:
        """The known spellings that occur in `text` (the index lookup of `redact_known`)."""
        if len(text) < self._shortest or not self._spelling_refs:
            return []
        data = _utf8(text)
        found: set[str] = set()
        for tier in self._tiers:
            if len(data) >= tier.min_bytes:
                tier.candidates(data, found)
        return [spelling for spelling in found if spelling in text]

    def lease(self, secret: str) -> object | None:
        """Keep `secret` known while the returned object lives (a call in flight holds it), even if
        its provider's entry is replaced, deleted or dropped by the LRU bound meanwhile."""
        if not _registrable(secret):
            return None
        with self._lock:
            self._retain(secret)
        return _Lease(self, secret)

    def may_touch(self, text: str) -> bool:
        """Whether some position of `text` could begin a known spelling: its first three
        characters (or the one or two left at the end of `text`) are the head of one.

        False means no known spelling occurs in `text` and no tail of it is the start of one:
        `redact_known` would return it unchanged and `hold_from` would hold nothing back. The
        stream scrubber asks this first, for every delta: with a few distinct heads (a handful
        of server keys: "sk-", "llm", ...) it is one substring search per head and two look-ups.
        With more heads, a text longer than `_WALK_CHARS` that holds a character some spelling
        begins with gets True without a look (True is always safe: the general path decides),
        so the Python work per call stays bounded, as in `hold_from`.
        """
        few = self._few_heads  # read once: replaced whole by a change in another thread
        heads = self._heads
        if few is not None:
            for head in few:
                if head in text:
                    return True
            # (Every spelling is longer than 3 characters: a 3-character tail is a head found above.)
            return text[-1:] in heads or text[-2:] in heads
        firsts = self._firsts
        if firsts.keys().isdisjoint(text):  # one C loop over the text's characters
            return False
        if len(text) > _WALK_CHARS:
            # "May" (the general path decides): the walk below is Python, ~0.15 us a position
            # whose character begins a spelling (most of English text when BYOK keys begin with
            # "s", "g", "t", ...), 0.2 s on the loop for a 1 MB delta. The general path's
            # Python work is bounded by the longest spelling (`hold_from` looks at the tail
            # only); its search for whole spellings is the tiers' scan, C-speed per byte.
            return True
        return any(text[p : p + 3] in heads for p in range(len(text)) if text[p] in firsts)

    def hold_from(self, text: str, start: int = 0) -> int:
        """Where the tail of `text` that could begin a known spelling starts (`len(text)`: none).

        The smallest position at or after `start` whose suffix is a proper prefix of a known
        spelling; the stream scrubber holds that tail back until more text decides it.
        """
        end = len(text)
        low = max(start, end - self._longest + 1)
        if low >= end:
            return end
        firsts = self._firsts
        if len(firsts) <= 8:
            # Few distinct first characters (a handful of server keys): jump to them with find.
            positions: list[int] = []
            for first in tuple(firsts):  # a copy: a lease's __del__ may change it meanwhile
                found = text.find(first, low)
                while found >= 0:
                    positions.append(found)
                    found = text.find(first, found + 1)
            if not positions:
                return end
            positions.sort()
        else:
            positions = [p for p in range(low, end) if text[p] in firsts]
        heads = self._heads
        spellings = self._sorted
        for position in positions:
            if text[position : position + 3] not in heads:
                continue
            if end - position <= 3:
                # A 1..3-character head of some spelling (every spelling is longer): a prefix.
                return position
            tail = text[position:]
            found = bisect.bisect_left(spellings, tail)
            if found < len(spellings) and spellings[found] == tail:
                found += 1
            if found < len(spellings) and spellings[found].startswith(tail):
                return position
        return end

    def redact(self, text: str) -> str:
        """`text` with every known secret and secret-looking value replaced by `[REDACTED]`."""
        if not text:
            return text
        text = self.redact_known(text)
        # `_RULES` in their order, each applied only when one of its keywords is in the text (the
        # lower-cased text for the ignore_case ones): `in` (C) decides that without the call.
        # Written out, not a loop over the rules: the loop's own bytecode cost ~4,000
        # instructions a call, more than the searches of a short text, and every trace is
        # scrubbed twice. test_auth_redact checks this against every rule applied to every text,
        # and each rule's keywords, prefilter and case against the tests here.
        if "llmgw_" in text:
            text = _apply(_GATEWAY_KEYS, text, text)
        if "sk-" in text:
            text = _apply(_SK_KEYS, text, text)
        if "AIza" in text:
            text = _apply(_GOOGLE_KEYS, text, text)
        lowered = text.lower()
        if len(lowered) != len(text):
            lowered = _aligned_lower(text)
        if "=" in text:  # the query rule's prefilter
            for keyword in _QUERY_PARAMS.keywords:
                if keyword in lowered:
                    new_text = _apply(_QUERY_PARAMS, text, lowered)
                    if new_text is not text:
                        text, lowered = new_text, _lower(new_text)
                    break
        if "authorization" in lowered or "key" in lowered:
            new_text = _apply(_HEADER_VALUES, text, lowered)
            if new_text is not text:
                text, lowered = new_text, _lower(new_text)
        if "bearer" in lowered:
            text = _apply(_BEARER_TOKENS, text, lowered)
        return text

    scrub = redact  # the name the request path uses: `Callable[[str], str]`

    def redact_error(self, error: GatewayError) -> None:
        """Scrub, in place, all an error shows: message, exception args, ErrorInfo metadata, violations.

        Upstream texts are scrubbed where errors are made; this catches every value that was not
        (a function name or a code an upstream chose, say) before it reaches a caller or a span.
        """
        error.message = self.redact(error.message)
        error.args = tuple(self.redact(arg) if isinstance(arg, str) else arg for arg in error.args)
        error.metadata = {key: self.redact(value) for key, value in error.metadata.items()}
        error.field_violations = tuple(
            dataclasses.replace(v, description=self.redact(v.description)) for v in error.field_violations
        )

    def redact_json(self, obj: object) -> object:
        """A copy of a JSON value with secret-named scalar fields replaced and all strings redacted."""
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            out: dict[object, object] = {}
            for key, value in obj.items():
                sensitive = isinstance(key, str) and key.lower().replace("-", "_") in SENSITIVE_JSON_KEYS
                if (
                    sensitive
                    and isinstance(value, str | int | float)
                    and not isinstance(value, bool)
                    and value != ""
                ):
                    out[key] = REDACTED
                else:
                    out[key] = self.redact_json(value)
            return out
        if isinstance(obj, list | tuple):
            return [self.redact_json(item) for item in obj]
        return obj


class _Lease:
    __slots__ = ("_redactor", "_secret")

    def __init__(self, redactor: Redactor, secret: str) -> None:
        self._redactor = redactor
        self._secret = secret

    def __del__(self) -> None:
        redactor = self._redactor
        with redactor._lock:  # noqa: SLF001 - the lease is part of the redactor
            if self._secret in redactor._refs:  # noqa: SLF001
                redactor._release(self._secret)  # noqa: SLF001


def _redact_record(record: logging.LogRecord, redactor: Redactor) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string must not lose the record
        message = str(record.msg)
    record.msg = redactor.redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redactor.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)


_installed: list[Redactor] = []  # the redactor of the installed record factory (at most one)
_original_factory: Callable[..., logging.LogRecord] | None = None


def install_log_redaction(redactor: Redactor) -> None:
    """Redact every log record of the process, whatever its logger or handler, present or future.

    Wraps the log record factory, so the message (with its arguments), the exception text and
    the stack are redacted when the record is made; records below a logger's level are never
    made, so disabled debug logging costs nothing. Installing again replaces the redactor.
    """
    global _original_factory
    if _installed:
        _installed[0] = redactor
        return
    original = logging.getLogRecordFactory()
    _original_factory = original
    _installed.append(redactor)
    _wrap_make_record()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = original(*args, **kwargs)
        if _installed:
            _redact_record(record, _installed[0])
        return record

    logging.setLogRecordFactory(factory)


_original_make_record: Callable[..., logging.LogRecord] | None = None


def _wrap_make_record() -> None:
    """`extra=` fields are set on a record after the factory made it (`Logger.makeRecord`), and
    structured handlers (JSON, OpenTelemetry) show them: redact them there too."""
    global _original_make_record
    if _original_make_record is not None:
        return
    original = logging.Logger.makeRecord
    _original_make_record = original

    def make_record(self: logging.Logger, *args: object, **kwargs: object) -> logging.LogRecord:
        record = original(self, *args, **kwargs)  # type: ignore[arg-type]
        extra = kwargs.get("extra", args[8] if len(args) > 8 else None)
        if extra and _installed and isinstance(extra, Mapping):
            redactor = _installed[0]
            fields = record.__dict__
            for key in extra:
                value = fields.get(key)
                if isinstance(value, str):
                    fields[key] = redactor.redact(value)
                elif isinstance(value, dict | list | tuple):
                    fields[key] = redactor.redact_json(value)
        return record

    logging.Logger.makeRecord = make_record  # type: ignore[method-assign]


def installed_redactor() -> Redactor | None:
    """The redactor of `install_log_redaction` (the process's known secrets), if any."""
    return _installed[0] if _installed else None


def uninstall_log_redaction() -> None:
    """Undo `install_log_redaction` (tests)."""
    global _original_factory
    global _original_make_record
    if _original_factory is not None:
        logging.setLogRecordFactory(_original_factory)
        _original_factory = None
    if _original_make_record is not None:
        logging.Logger.makeRecord = _original_make_record  # type: ignore[method-assign]
        _original_make_record = None
    _installed.clear()


def _registrable(secret: str) -> bool:
    return bool(secret) and len(secret) >= MIN_SECRET_LENGTH


# Operator-facing texts (start-up lines, store errors in logs): the credentials the operator
# configured (DSN passwords, ClickHouse keys, proxy passwords) shown as ***.
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo (and any libpq `password=`) replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            parts = parts._replace(netloc=f"{user}:***@{host}")
        query = re.sub(r"(?i)((?:^|&)(?:password|key)=)[^&]*", r"\1***", parts.query)
        url = urlunsplit(parts._replace(query=query))
    except ValueError:
        pass
    return _DSN_PASSWORD.sub(r"\1***", url)


_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def redact_text(text: str, *secrets: str) -> str:
    """`text` without the given secrets, URL passwords or libpq `password=` values."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _DSN_PASSWORD.sub(r"\1***", text)


def describe_error(exc: BaseException, *secrets: str, limit: int = 300) -> str:
    """A short, secret-free description of an exception for a log line."""
    text = redact_text(str(exc), *secrets)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
