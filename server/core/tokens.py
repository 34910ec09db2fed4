"""Context-window token counting with tiktoken, loaded only from vocabularies on disk.

The counting rules are the seed's (letta `num_tokens_from_messages` / `num_tokens_from_functions`),
so an agent's budget here matches the one it was tuned against. Vocabularies come from files
shipped with the install, checked against the SHA-256 digests tiktoken itself pins: both are
gzip-compressed package data in `encodings/` beside this module, read with importlib.resources.
Nothing is ever downloaded; an encoding that cannot be loaded falls back to cl100k_base, once,
with a warning, and every result names the encoding actually used.

On the request path counts are async (`start_request_count`/`finish_count`,
`count_request_tokens_async`, `count_texts_async`): up to `INLINE_CHARS` new characters are
encoded on the event loop, the rest in `server.core.offload`'s bounded pool. A request whose
function set is huge (`validation.off_loop`) is counted whole in the pool (`off=True`): walking
600,000 enum options costs seconds even when every string is remembered.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import logging
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources.abc import Traversable
from typing import Any, Final

import orjson
import tiktoken
from tiktoken.model import encoding_name_for_model

from server.core import offload

logger = logging.getLogger(__name__)

O200K_BASE: Final = "o200k_base"
CL100K_BASE: Final = "cl100k_base"

# Digests of the official files, as pinned in tiktoken_ext/openai_public.py.
_CL100K_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_O200K_SHA256: Final = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# The digests are of the decompressed files (tiktoken's); the .gz only saves space in the package.
_ENCODINGS: Final = importlib.resources.files("server.core").joinpath("encodings")
_CL100K_FILE: Traversable = _ENCODINGS.joinpath("cl100k_base.tiktoken.gz")
_O200K_FILE: Traversable = _ENCODINGS.joinpath("o200k_base.tiktoken.gz")

# Split patterns and special tokens as defined in tiktoken_ext/openai_public.py: that module only
# builds them after fetching the vocabulary, so they cannot be borrowed without the network.
_CL100K_PAT: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_SPECIAL: Final = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
_O200K_SPECIAL: Final = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}

# tiktoken's tables miss bare family names ("o4") and new members; these are o200k families too.
# Checked before tiktoken's own table, whose prefixes misread some names ("ft:gpt-4" catches
# "ft:gpt-4.1-...", which is o200k).
_O200K_FAMILIES: Final = (
    "o1",
    "o3",
    "o4",
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "gpt-oss",
    "codex-mini",
)
_O200K_FAMILY_PREFIXES: Final = tuple(f"{family}-" for family in _O200K_FAMILIES)

# Seed constants (letta): per message, per `name`, reply priming, tool-call and function overheads.
_TOKENS_PER_MESSAGE: Final = 3
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3
_TOOL_CALLS_OVERHEAD: Final = 12
_TOOL_CALL_FIELD: Final = 2
_PROPERTY_FIELD: Final = 2
_ENUM_OPTION: Final = 3
_PROPERTIES_OVERHEAD: Final = 11
_FUNCTIONS_OVERHEAD: Final = 12

# Agents resend the same system prompt, history and tool schemas on every step, so counts of
# strings already seen are remembered. The budget (characters held, plus a per-entry allowance
# for small strings) bounds memory; when it is spent the cache starts over, which is cheaper
# than LRU bookkeeping on every hit.
_CACHE_BUDGET_CHARS: Final = 8_000_000
_CACHE_MAX_TEXT_CHARS: Final = 1_000_000
_CACHE_ENTRY_CHARS: Final = 64

# Characters one count may encode on the event loop; the rest of its strings are encoded in
# `server.core.offload`'s pool. tiktoken's slowest input (CJK, one regex piece) costs ~0.8 us per
# character, so the loop is held at most ~25 ms; a normal request encodes only its new strings
# (the memo has the rest), far less, and pays no thread hop. Above this size the hop (~0.1 ms) is
# a few percent of the encode.
INLINE_CHARS: Final = 32_768

_EMPTY: Final[Mapping[str, Any]] = {}

_Count = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class TokenCount:
    """Tokens of a request's prompt and function definitions, and the encoding that counted them."""

    prompt_tokens: int
    function_tokens: int
    encoding: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.function_tokens


def _read_ranks(source: Traversable, sha256: str) -> dict[bytes, int]:
    try:
        data = gzip.decompress(source.read_bytes())
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{source} is not a readable gzip file ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{source} has SHA-256 {digest}, expected {sha256}")
    b64decode = base64.b64decode
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _cl100k() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name=CL100K_BASE,
        pat_str=_CL100K_PAT,
        mergeable_ranks=_read_ranks(_CL100K_FILE, _CL100K_SHA256),
        special_tokens=_CL100K_SPECIAL,
    )


@lru_cache(maxsize=1)
def _o200k() -> tiktoken.Encoding | None:
    try:
        ranks = _read_ranks(_O200K_FILE, _O200K_SHA256)
    except (OSError, ValueError) as exc:
        logger.warning("o200k_base could not be loaded offline (%s); counting with cl100k_base", exc)
        return None
    return tiktoken.Encoding(
        name=O200K_BASE, pat_str=_O200K_PAT, mergeable_ranks=ranks, special_tokens=_O200K_SPECIAL
    )


def _base_model(model: str) -> str:
    """The model a name stands for: no provider prefix, variant suffix, fine-tune wrapping or case."""
    # Gateway handles carry a provider prefix ("openai/gpt-4o") that tiktoken does not know.
    name = model.rpartition("/")[2].strip().lower()
    if name.startswith("ft:"):
        # ft:<base>:<organization>:<suffix>:<id>: the tokenizer is the base model's.
        return name[3:].partition(":")[0]
    # OpenRouter variants ("gpt-4o:free", ":online") and Ollama tags ("llama3.1:8b").
    return name.partition(":")[0]


def _model_encoding_name(model: str) -> str:
    name = _base_model(model)
    if name in _O200K_FAMILIES or name.startswith(_O200K_FAMILY_PREFIXES):
        return O200K_BASE
    try:
        official = encoding_name_for_model(name)
    except KeyError:
        return CL100K_BASE
    # o200k_harmony only adds special tokens, which ordinary text never produces.
    return O200K_BASE if official.startswith("o200k_") else CL100K_BASE


@lru_cache(maxsize=512)
def encoding_for_model(model: str) -> tuple[tiktoken.Encoding, str]:
    """The model's encoding and its name: o200k_base where it applies and loads, else cl100k_base."""
    if _model_encoding_name(model) == O200K_BASE:
        encoding = _o200k()
        if encoding is not None:
            return encoding, O200K_BASE
    return _cl100k(), CL100K_BASE


# tiktoken's BPE is super-linear in the length of one regex piece (a run of letters without a
# space: 0.4 M characters 0.16 s, 0.8 M 0.36 s, 1.6 M 0.90 s; ~n^1.3, so a 32 MiB answer is about a
# minute), and it panics on some long runs (fancy-regex stack overflow, openai/tiktoken#15: ~1M
# spaces with o200k_base). A text longer than SLICE_CHARS is therefore counted in slices of at most
# that many characters, which bounds the work per character. A slice ends, by preference:
#   1. before a space that follows a non-space: both split patterns start a piece there and no
#      piece spans it, so the count is exact (ordinary prose and code are always cut here);
#   2. after a letter or digit followed by punctuation that never joins it (not an apostrophe,
#      which o200k's contractions attach): exact for the same reason (CJK text with its commas);
#   3. else at SLICE_CHARS: inside one piece (a run of letters, digits, whitespace, punctuation),
#      where the count may differ from the whole text's by about one token (measured: at most 1
#      per cut, on random letters, one repeated letter, digits, CJK, base64, whitespace).
# Texts up to SLICE_CHARS (every ordinary message and answer) are encoded whole: exact.
SLICE_CHARS: Final = 65_536

# Preference 2: the position after an alphanumeric character followed by ASCII or CJK punctuation
# other than the apostrophe (what follows is never a letter, a digit, a mark or whitespace).
_SAFE_CUT: Final = re.compile(
    r"(?<=[^\W_])(?=[!-&(-/:-@\[-`{-~\u3000-\u3003\u3008-\u3011\uff01-\uff0f\uff1a-\uff20])"
)

# A long whitespace run has no space preceded by a non-space: give up looking after this many.
_SPACE_TRIES: Final = 64


def encoded_length(encoding: tiktoken.Encoding, text: str) -> int:
    """Tokens of `text` as ordinary text; a text over SLICE_CHARS is counted in slices."""
    if len(text) > SLICE_CHARS:
        return _length_in_slices(encoding, text, SLICE_CHARS)
    try:
        return len(encoding.encode_ordinary(text))
    except BaseException as exc:
        # pyo3's PanicException derives from BaseException and cannot be imported by name.
        if type(exc).__name__ != "PanicException":
            raise
    logger.warning("tiktoken could not encode a %d-character text whole; counting it in slices", len(text))
    return _length_in_slices(encoding, text, 4096)


def slice_ends(text: str, size: int) -> list[int]:
    """Where `_length_in_slices` cuts `text`: each slice at most `size` and at least half of it
    (but the last), ended at the first of the three preferences above that the window offers."""
    ends: list[int] = []
    start = 0
    length = len(text)
    while length - start > size:
        low = start + size // 2
        end = start + size
        cut = text.rfind(" ", low, end + 1)
        tries = _SPACE_TRIES
        while cut > low and text[cut - 1].isspace() and tries:
            cut = text.rfind(" ", low, cut)
            tries -= 1
        if cut <= low or text[cut - 1].isspace():
            cut = -1
            for match in _SAFE_CUT.finditer(text, low + 1, end + 1):
                cut = match.start()
            if cut <= low:
                cut = end
        ends.append(cut)
        start = cut
    ends.append(length)
    return ends


def _length_in_slices(encoding: tiktoken.Encoding, text: str, size: int) -> int:
    total = 0
    start = 0
    for end in slice_ends(text, size):
        total += len(encoding.encode_ordinary(text[start:end]))
        start = end
    return total


# Memo writes come from the loop and from the offload pool's threads (a count done there is
# remembered there, so a caller that gave up does not waste it); reads are plain dict lookups.
_MEMO_LOCK: Final = threading.Lock()


class _Memo:
    """Counts of strings already seen, for one encoding, within a character budget."""

    __slots__ = ("cache", "held")

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}
        self.held = 0

    def remember(self, text: str, tokens: int) -> None:
        size = len(text)
        if size <= _CACHE_MAX_TEXT_CHARS:
            with _MEMO_LOCK:
                self.held += size + _CACHE_ENTRY_CHARS
                if self.held > _CACHE_BUDGET_CHARS:
                    self.cache.clear()  # the same dict: counters hold its bound `get`
                    self.held = size + _CACHE_ENTRY_CHARS
                self.cache[text] = tokens


@lru_cache(maxsize=4)
def _memo(encoding: tiktoken.Encoding) -> _Memo:
    return _Memo()


def clear_memo() -> None:
    """Forget every remembered count (tests)."""
    for encoding in (_cl100k(), _o200k()):
        if encoding is not None:
            memo = _memo(encoding)
            memo.cache.clear()
            memo.held = 0
    global _FUNCTION_TOKENS_HELD
    with _MEMO_LOCK:
        _clear_function_memo()
        _FUNCTION_TOKENS_HELD = 0


@lru_cache(maxsize=4)
def _counter(encoding: tiktoken.Encoding) -> _Count:
    """Counts on the calling thread, whatever the size (the synchronous API)."""
    memo = _memo(encoding)
    lookup = memo.cache.get
    remember = memo.remember

    def count(text: str) -> int:
        tokens = lookup(text)
        if tokens is None:
            tokens = encoded_length(encoding, text)
            remember(text, tokens)
        return tokens

    return count


def _budgeted_counter(encoding: tiktoken.Encoding, budget: int) -> tuple[_Count, list[str]]:
    """A counter that encodes at most `budget` new characters; the strings beyond it are left in
    the returned list (counted as 0 for now) for the caller to encode off the loop."""
    memo = _memo(encoding)
    lookup = memo.cache.get
    remember = memo.remember
    left: list[str] = []
    budget_left = budget

    def count(text: str) -> int:
        nonlocal budget_left
        tokens = lookup(text)
        if tokens is None:
            size = len(text)
            if size > budget_left:
                left.append(text)
                return 0
            budget_left -= size
            tokens = encoded_length(encoding, text)
            remember(text, tokens)
        return tokens

    return count, left


def preload() -> None:
    """Load every bundled encoding now, so the first request does not pay for it."""
    _cl100k()
    _o200k()


def _tool_call_tokens(tool_calls: Sequence[Mapping[str, Any]], count: _Count) -> int:
    total = _TOOL_CALLS_OVERHEAD
    for call in tool_calls:
        function = call.get("function") or _EMPTY
        total += (
            count(call.get("id") or "")
            + _TOOL_CALL_FIELD
            + count(call.get("type") or "")
            + _TOOL_CALL_FIELD
            + count(function.get("name") or "")
            + _TOOL_CALL_FIELD
            + count(function.get("arguments") or "")
        )
    return total


def _thinking_tokens(blocks: Sequence[Any], count: _Count) -> int:
    # Only the reasoning text is prompt text; signatures and redacted data are opaque tokens
    # the provider does not bill as their characters.
    return sum(
        count(block["thinking"])
        for block in blocks
        if isinstance(block, Mapping) and isinstance(block.get("thinking"), str)
    )


def _content_parts_tokens(parts: Sequence[Any], count: _Count) -> int:
    total = 0
    for part in parts:
        if isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                total += count(text)
    return total


def count_message_tokens(messages: Sequence[Mapping[str, Any]], encoding: tiktoken.Encoding) -> int:
    """Tokens of OpenAI chat-format messages, by the seed's rules.

    Each message costs 3, plus 1 if it has a `name` key, plus the tokens of every string value
    (role included); a `tool_calls` list costs 12 plus, per call, its id and 2 + each of type,
    function name and arguments; the reply priming costs 3. Special-token text counts as
    ordinary text. One fix over the seed, which raised on any non-string value: a `content`
    list of parts counts the text of its text parts (images and other parts count nothing);
    `thinking_blocks` (a past answer's reasoning, sent back to Anthropic/Gemini) count their text.
    Any other non-string value is a caller bug and raises TypeError.
    """
    return _message_tokens(messages, _counter(encoding))


def _message_tokens(messages: Sequence[Mapping[str, Any]], count: _Count) -> int:
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            if type(value) is str:
                total += count(value)
            elif value is None:
                pass
            elif key == "tool_calls" and isinstance(value, list | tuple):
                total += _tool_call_tokens(value, count)
            elif key == "content" and isinstance(value, list | tuple):
                total += _content_parts_tokens(value, count)
            elif key == "thinking_blocks" and isinstance(value, list | tuple):
                total += _thinking_tokens(value, count)
            elif isinstance(value, str):
                total += count(value)
            else:
                raise TypeError(f"message key {key!r} has a non-string value of type {type(value).__name__}")
            if key == "name":
                total += _TOKENS_PER_NAME
    return total


def _schema_text(value: Any) -> str:
    # The seed encodes these raw and crashes on non-strings; a JSON Schema may hold numbers.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _property_tokens(spec: Mapping[str, Any], count: _Count) -> int:
    total = 0
    for field, value in spec.items():
        if field == "type":
            total += _PROPERTY_FIELD + count(_schema_text(value))
        elif field == "description":
            total += _PROPERTY_FIELD + count(_schema_text(value))
        elif field == "enum":
            total -= _ENUM_OPTION
            for option in value:
                total += _ENUM_OPTION + count(_schema_text(option))
        elif field == "items":
            total += _PROPERTY_FIELD
            if isinstance(value, Mapping) and "type" in value:
                total += count(_schema_text(value["type"]))
        elif field == "default":
            total += _PROPERTY_FIELD + count(str(value))
    return total


def count_function_tokens(functions: Sequence[Mapping[str, Any]], encoding: tiktoken.Encoding) -> int:
    """Tokens of function definitions, by the seed's rules; 0 when there are none.

    Per function: its name and description; per top-level property its name, 2 + type,
    2 + description, enum (-3, then 3 + each option), 2 for items (+ the items' type),
    2 + default (as Python `str()`); 11 per function that has `properties`; 12 overall.
    Nested schemas and other keywords count nothing, as in the seed. Both the bare
    `{"name", "description", "parameters"}` shape and the `tools` wrapper
    `{"type": "function", "function": {...}}` are accepted.
    """
    if not functions:
        return 0
    return _function_tokens(functions, encoding.name, _counter(encoding), [])


class SharedFunctionList(list[dict[str, Any]]):
    """A function list shared, read-only, by every request that sends the same functions (the
    request path's cached prompt functions, `openai_request.prompt_functions`): its count is
    remembered on it, so an agent's step looks up its tool set once (not once per tool: ~1,500
    instructions each).

    `counted`: by encoding name, (the function memo's generation when counted, the function
    tokens). Kept on the list, it goes with the list: a memo of lists by identity would keep
    alive the lists the prompt cache drops (and, full of those, remember no live one)."""

    __slots__ = ("counted",)

    def __init__(self, entries: Iterable[dict[str, Any]]) -> None:
        super().__init__(entries)
        self.counted: dict[str, tuple[int, int]] = {}


def _function_tokens(
    functions: Sequence[Mapping[str, Any]], encoding_name: str, count: _Count, left: list[str]
) -> int:
    """`count_function_tokens` with any counter; `left` is the budgeted counter's list of strings
    not counted yet (a function whose count is incomplete is not remembered)."""
    counted: dict[str, tuple[int, int]] | None = None  # a shared list's own counts
    if type(functions) is SharedFunctionList:
        counted = functions.counted
        generation = _FUNCTION_TOKENS_GENERATION
        known_list = counted.get(encoding_name)
        if known_list is not None and known_list[0] == generation:
            return known_list[1]
    total = _FUNCTIONS_OVERHEAD
    memo = _FUNCTION_TOKENS
    every_entry_kept = True
    for entry in functions:
        # The request path hands in the same (cached, read-only) dict objects on every step of an
        # agent: their count is remembered per object. The entry keeps the dict alive, so its id
        # cannot be reused while remembered; a dict mutated after counting would be miscounted.
        key = (id(entry), encoding_name)
        known = memo.get(key)
        if known is not None and known[0] is entry:
            total += known[1]
            continue
        pending = len(left)
        tokens = _one_function_tokens(entry, count)
        total += tokens
        if len(left) != pending:
            every_entry_kept = False
            continue
        every_entry_kept = _remember_function(key, entry, tokens) and every_entry_kept
    if counted is not None and every_entry_kept and generation == _FUNCTION_TOKENS_GENERATION:
        # With the generation read before counting: one made across a clear (even one racing
        # this check) is never used.
        counted[encoding_name] = (generation, total)
    return total


# The memo pins the dicts it counted: bounded in entries (a full tool set of MAX_FUNCTIONS fits,
# in both encodings, or an agent past 512 tools would recount every step) and in their size as
# JSON (fresh dicts, the local servers' path, must not pile up either).
_FUNCTION_TOKENS: dict[tuple[int, str], tuple[Mapping[str, Any], int]] = {}
_FUNCTION_TOKENS_MAX = 4096
_FUNCTION_TOKENS_BUDGET_BYTES = 32 * 1024 * 1024
_FUNCTION_TOKENS_HELD = 0
# The clears of `_FUNCTION_TOKENS`: a SharedFunctionList's own count is used only while the
# generation it was made in lasts (it is forgotten with the entries' counts, as before).
_FUNCTION_TOKENS_GENERATION = 0


def _function_weight(entry: Mapping[str, Any], tokens: int) -> int:
    try:
        return len(orjson.dumps(entry)) + 64
    except TypeError:  # not JSON-ready (a caller's own mapping): a token is a few bytes
        return 8 * tokens + 64


def _remember_function(key: tuple[int, str], entry: Mapping[str, Any], tokens: int) -> bool:
    """Keep one entry's count; False if it is too large to keep."""
    global _FUNCTION_TOKENS_HELD
    weight = _function_weight(entry, tokens)
    if weight > _FUNCTION_TOKENS_BUDGET_BYTES:
        return False
    with _MEMO_LOCK:
        memo = _FUNCTION_TOKENS
        _FUNCTION_TOKENS_HELD += weight
        if len(memo) >= _FUNCTION_TOKENS_MAX or _FUNCTION_TOKENS_HELD > _FUNCTION_TOKENS_BUDGET_BYTES:
            _clear_function_memo()
            _FUNCTION_TOKENS_HELD = weight
        memo[key] = (entry, tokens)
    return True


def _clear_function_memo() -> None:
    """Forget every function count (under _MEMO_LOCK); the caller resets the bytes held."""
    global _FUNCTION_TOKENS_GENERATION
    _FUNCTION_TOKENS.clear()
    _FUNCTION_TOKENS_GENERATION += 1


def _one_function_tokens(entry: Mapping[str, Any], count: _Count) -> int:
    """One function's share of `count_function_tokens` (everything but the overall 12)."""
    total = 0
    function = entry.get("function") if entry.get("type") == "function" else None
    if not isinstance(function, Mapping):
        function = entry
    total += count(function.get("name") or "")
    description = function.get("description")
    if isinstance(description, str):
        total += count(description)
    parameters = function.get("parameters")
    if isinstance(parameters, Mapping):
        properties = parameters.get("properties")
        if isinstance(properties, Mapping):
            for name, spec in properties.items():
                total += count(name)
                if isinstance(spec, Mapping):
                    total += _property_tokens(spec, count)
            total += _PROPERTIES_OVERHEAD
    return total


def count_request_tokens(
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None,
    model: str,
) -> TokenCount:
    """Count a request's prompt and function tokens with the model's encoding."""
    encoding, name = encoding_for_model(model)
    return TokenCount(
        prompt_tokens=count_message_tokens(messages, encoding),
        function_tokens=count_function_tokens(functions, encoding) if functions else 0,
        encoding=name,
    )


@dataclass(slots=True)
class PendingCount:
    """A request count whose inline budget ran out: the strings left, to encode off the loop."""

    prompt_tokens: int
    function_tokens: int
    encoding: tiktoken.Encoding
    encoding_name: str
    prompt_left: list[str]
    function_left: list[str]


def start_request_count(
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None,
    model: str,
) -> TokenCount | PendingCount:
    """`count_request_tokens`, encoding at most `INLINE_CHARS` new characters here: the whole
    count when that suffices (normal requests: no thread hop), else what `finish_count` needs."""
    encoding, name = encoding_for_model(model)
    count, left = _budgeted_counter(encoding, INLINE_CHARS)
    prompt_tokens = _message_tokens(messages, count)
    prompt_left = left[:]
    function_tokens = _function_tokens(functions, name, count, left) if functions else 0
    if not left:  # positional: keywords matched by name cost ~1,600 instructions more here
        return TokenCount(prompt_tokens, function_tokens, name)
    return PendingCount(prompt_tokens, function_tokens, encoding, name, prompt_left, left[len(prompt_left) :])


async def finish_count(pending: PendingCount) -> TokenCount:
    """Encode what `start_request_count` left, in the offload pool, and complete the count."""
    encoding = pending.encoding
    texts = pending.prompt_left + pending.function_left
    remember = _memo(encoding).remember

    def job() -> list[int]:
        lengths = [encoded_length(encoding, text) for text in texts]
        # Remembered in the job, not after the await: a caller past its deadline retries the same
        # prompt, and a count slower than its deadline would otherwise never complete.
        for text, tokens in zip(texts, lengths, strict=True):
            remember(text, tokens)
        return lengths

    lengths = await offload.run(job)
    split = len(pending.prompt_left)
    return TokenCount(
        prompt_tokens=pending.prompt_tokens + sum(lengths[:split]),
        function_tokens=pending.function_tokens + sum(lengths[split:]),
        encoding=pending.encoding_name,
    )


async def count_request_tokens_async(
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None,
    model: str,
    *,
    off: bool = False,
) -> TokenCount:
    """`count_request_tokens` that never holds the event loop for a large request; `off`: the
    whole count in the pool (a huge function set, `validation.off_loop`)."""
    if off:
        return await offload.run(lambda: count_request_tokens(messages, functions, model))
    started = start_request_count(messages, functions, model)
    if isinstance(started, TokenCount):
        return started
    return await finish_count(started)


async def count_texts_async(texts: Sequence[str], model: str) -> int:
    """Tokens of answer texts (never remembered: answers do not repeat), off the loop when large."""
    encoding, _ = encoding_for_model(model)
    if sum(map(len, texts)) <= INLINE_CHARS:
        return sum(encoded_length(encoding, text) for text in texts)
    return await offload.run(lambda: sum(encoded_length(encoding, text) for text in texts))
