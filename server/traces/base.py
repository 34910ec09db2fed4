"""The provider-trace record and the interface every trace backend implements.

The request path builds a `TraceRecord` and hands it to the trace writer, which only enqueues;
each backend has its own bounded queue and background task (see `server.traces.writer`).

Also here, shared by the backends: microsecond timestamps, keyset page tokens, redaction of
passwords in DSNs and URLs, and a rate-limited logger. Backends never log record contents.
"""

from __future__ import annotations

import abc
import base64
import builtins
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.traces.usage import UsageQuery, UsageTotals

_TRACE_ID = "provider_trace-%08x-%04x-%04x-%04x-%012x"


def new_trace_id() -> str:
    """`provider_trace-<uuid>` with a version-7 UUID: milliseconds since the epoch, then random.

    Time-ordered ids keep the trace tables' primary-key index append-mostly: random (version-4)
    ids scatter every insert over the whole index, which measured ~25% more writer CPU per
    trace at 100,000 rows and grows with the table. The 74 random bits come from the process's
    seeded PRNG, not os.urandom (ids are not secrets; this skips a system call per request).
    """
    bits = random.getrandbits(74)
    millis = time.time_ns() // 1_000_000
    # The five groups of the UUID formatted at once, each from its own bits: the 128-bit value
    # formatted whole and then cut into five slices cost twice as many instructions. Groups:
    # 48 bits of milliseconds (8 + 4 hex digits), version 7 and 12 random bits, the RFC variant
    # (binary 10) and 14 random bits, the last 48 random bits (test_trace_base checks the layout
    # against the value built whole).
    return _TRACE_ID % (
        millis >> 16,
        millis & 0xFFFF,
        0x7000 | bits >> 62,
        0x8000 | (bits >> 48) & 0x3FFF,
        bits & 0xFFFF_FFFF_FFFF,
    )


@dataclass(slots=True)
class TraceRecord:
    """One provider call. JSON fields hold JSON text, already redacted of every key."""

    id: str
    created_at: datetime  # timezone-aware UTC
    organization_id: str = ""
    user_id: str = ""
    step_id: str = ""
    agent_id: str = ""
    agent_tags: list[str] = field(default_factory=list)
    run_id: str = ""
    call_type: str = "agent_step"
    provider: str = ""
    model: str = ""
    model_endpoint_type: str = ""
    is_byok: bool = False
    request_json: str = ""
    response_json: str = ""  # empty when the call failed
    error_type: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    latency_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # streams only
    llm_config_json: str = ""  # the request's LLMConfig as JSON text (socket protocol field)
    # Who may read the trace besides the organization's admins: `trace_owner` of the gateway key
    # that made the call, never anything the request says ("" for traces made with auth off and
    # for traces stored before this column existed: admins only).
    owner: str = ""
    # Prompt tokens written to the provider's cache (Anthropic), part of prompt_tokens. Last, so
    # the column order of older tables stays a prefix (each backend's migration 3 adds it).
    cache_write_tokens: int = 0
    # The parameters the provider was not sent as given (`Provider.build_body` notes, through
    # `trace_notes`); after cache_write_tokens for the same reason (each backend's migration 4).
    notes: list[str] = field(default_factory=list)
    # Routed calls (issue 16): the route the request named, the deployment of this call, and
    # every attempt of the call so far as JSON text (`server.routing.attempts_json`). Last, as
    # above (a migration of each backend adds them).
    route: str = ""
    deployment: str = ""
    attempts_json: str = ""
    # What the call cost, US dollars as an exact decimal string (`server.billing.cost.dollars`);
    # None when it is not known: an unpriced model, a failed call, or a row stored before the
    # column existed. Never "0" for unknown. Then the gateway key that made the call (its public
    # id; "" with auth off), for usage by key. Both added by a migration of each backend.
    cost_usd: str | None = None
    key_id: str = ""


# Notes are parameter names the gateway wrote; the bounds only keep a trace small whatever a
# provider module returns.
MAX_TRACE_NOTES = 32
MAX_TRACE_NOTE_CHARS = 200


def trace_notes(notes: Sequence[str], scrub: Callable[[str], str]) -> list[str]:
    """`notes` bounded in number and length and scrubbed of keys, as a trace stores them."""
    if not notes:  # the usual case: no slice and no comprehension to run
        return []
    return [scrub(note)[:MAX_TRACE_NOTE_CHARS] for note in notes[:MAX_TRACE_NOTES]]


def trace_owner(*, user_id: str, key_id: str) -> str:
    """The `owner` of traces made with a key: its user, or the key itself when it has no user.

    Every key of one user shares that user's traces (a rotated key keeps reading them); a key
    without a user (an organization-level key) owns only what it made. The prefixes keep a user
    id from ever equalling a key's owner. "" for the anonymous actor (auth off).
    """
    if user_id:
        return "user:" + user_id
    if key_id:
        return "key:" + key_id
    return ""


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """Filters of ListProviderTraces; empty strings and None match everything."""

    organization_id: str
    # None reads the whole organization (admin keys, auth off); else only traces of this owner.
    owner: str | None = None
    step_id: str = ""
    run_id: str = ""
    agent_id: str = ""
    start_time: datetime | None = None  # inclusive
    end_time: datetime | None = None  # exclusive
    limit: int = 50
    # Stop reading once the traces read hold this many bytes (`record_bytes`), the trace that
    # crosses the bound included: a page of big traces is never all loaded. None: no bound.
    max_bytes: int | None = None
    # Keyset cursor: traces strictly older than (created_at, id) in newest-first order.
    before: tuple[datetime, str] | None = None
    # The console's filters (ListProviderTraces sets none of them).
    trace_id: str = ""  # exactly this trace (the console's trace page)
    model: str = ""
    provider: str = ""
    error_type: str = ""  # exactly this ErrorInfo reason
    status: str = ""  # "ok": no error; "error": any error; "": both
    tag: str = ""  # one of the trace's agent_tags


# The most rows `TraceBackend.points` returns: the overview of a busy week is drawn from the
# newest this many traces of the window (and says so), not from an unbounded read.
MAX_POINTS = 100_000
STATUSES = ("", "ok", "error")


@dataclass(frozen=True, slots=True)
class TracePoint:
    """The few numbers of one trace the console's overview charts (no request or answer text)."""

    created_at_us: int
    provider: str
    model: str
    error_type: str
    latency_ms: float
    time_to_first_token_ms: float
    prompt_tokens: int
    completion_tokens: int


POINT_COLUMNS = (
    "provider", "model", "error_type", "latency_ms", "time_to_first_token_ms", "prompt_tokens",
    "completion_tokens",
)  # fmt: skip


class TraceBackend(abc.ABC):
    """A store of traces. Writes are batched by the writer; reads serve the trace RPCs."""

    name: str = "backend"
    readable: bool = True  # False for write-only backends (socket)
    # The largest batch this backend wants; None takes the writer's batch_size.
    batch_size: int | None = None
    # True when the backend's writes are blocking calls (a local file): the writer then gives its
    # lane a dedicated thread that calls `write_batch_sync`, so writing never waits on a busy
    # event loop and never runs on it. `start`, `close` and the reads stay on the loop.
    threaded: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Connect and migrate. Called once before the first write."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. Called once after the last write."""

    @abc.abstractmethod
    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        """Persist every record or raise; the writer retries the whole batch."""

    def rejects(self, exc: BaseException) -> bool:
        """True when `exc` says some trace of the batch can never be stored (not a passing failure).

        The writer then splits the batch until the offending trace is alone and drops only it.
        """
        return isinstance(exc, ENCODING_ERRORS)

    def write_batch_sync(self, records: Sequence[TraceRecord]) -> None:
        """`write_batch` as a blocking call, from the writer's thread; only when `threaded`."""
        raise NotImplementedError(f"{self.name} has no blocking write")

    async def apply_retention(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """Prepare for `LLMGW_TRACE_RETENTION` (an index, a TTL); called once after start()."""

    async def prune(self, *, before: datetime, limit: int) -> int:
        """Delete at most `limit` traces created before `before`; how many it deleted.

        0 for a backend that does not prune this way (ClickHouse expires rows by its TTL, the
        socket stores nothing).
        """
        return 0

    async def get_latest(
        self, *, organization_id: str, step_id: str, owner: str | None = None
    ) -> TraceRecord | None:
        """The newest trace of the step; `owner` as in `TraceQuery`."""
        raise NotImplementedError(f"{self.name} is write-only")

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        raise NotImplementedError(f"{self.name} is write-only")

    async def points(self, *, query: TraceQuery) -> builtins.list[TracePoint]:
        """`TracePoint`s of the traces `query` matches, newest first, at most `query.limit`
        (capped at MAX_POINTS); its cursor and byte bound are ignored."""
        raise NotImplementedError(f"{self.name} is write-only")

    async def usage(self, *, query: UsageQuery) -> builtins.list[UsageTotals]:
        """GetUsage's sums (server.traces.usage), ordered by the grouped-by values."""
        raise NotImplementedError(f"{self.name} is write-only")


# Errors raised while encoding rows (a lone surrogate in a str, an integer beyond 64 bits): the
# data itself cannot be stored, so retrying the same trace cannot help.
ENCODING_ERRORS: tuple[type[BaseException], ...] = (UnicodeError, TypeError, ValueError, OverflowError)

_RECORD_OVERHEAD = 512  # the record object, its small fields and its row
# `record_size` as SQL over a trace row (octet_length / length: bytes, close enough), for stores
# that bound a read in bytes before loading the rows.
RECORD_SIZE_COLUMNS = (
    "request_json",
    "response_json",
    "llm_config_json",
    "error_message",
    "step_id",
    "run_id",
    "agent_id",
)


def record_size_sql(length_function: str) -> str:
    """The SQL expression of `record_size` with `length_function` (e.g. octet_length)."""
    return " + ".join([str(_RECORD_OVERHEAD), *(f"{length_function}({c})" for c in RECORD_SIZE_COLUMNS)])


def record_size(record: TraceRecord) -> int:
    """About how many bytes a queued trace pins: its text fields plus a fixed overhead.

    Never less than the memory the texts hold, and cheap (no scan, no encoding on the request
    path): exact for the ASCII that JSON with escapes and base64 images mostly is, four bytes a
    character for other text (CJK, emoji), so non-ASCII text cannot pin 4x the bound.

    A text's bound is O(1): CPython keeps ASCII at one byte a character and any other text at
    up to four (`str.isascii` reads a flag, it does not scan). One loop, no call per text: this
    runs on every trace's enqueue, on the loop (the writer's queue keeps the figure for the
    batch and the drops: a record is never changed once queued).
    """
    r = record
    size = _RECORD_OVERHEAD
    texts = (
        r.request_json,
        r.response_json,
        r.llm_config_json,
        r.error_message,
        r.step_id,
        r.run_id,
        r.agent_id,
    )
    for text in texts:
        size += len(text) if text.isascii() else 4 * len(text)
    if r.agent_tags or r.notes:
        for text in (*r.agent_tags, *r.notes):
            size += len(text) if text.isascii() else 4 * len(text)
    return size


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def record_bytes(record: TraceRecord) -> int:
    """`record_size_sql` of a trace read from a store, in Python: UTF-8 bytes, never less.

    Every store stops reading a page once the traces read hold `TraceQuery.max_bytes` of this
    (SQLite in Python, PostgreSQL with octet_length, ClickHouse with length, both bytes), so the
    reader tells with it whether a store stopped at the bound (and more traces may follow).
    """
    r = record
    return (
        _RECORD_OVERHEAD
        + sum(_utf8(getattr(r, column)) for column in RECORD_SIZE_COLUMNS)
        + sum(_utf8(tag) for tag in r.agent_tags)
    )


# Every column a store keeps, in the order of the record's fields.
TRACE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TraceRecord))

# Reads never return more than this many traces at once, whatever the query asks.
MAX_LIST_LIMIT = 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch, exactly (naive datetimes are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    """The timezone-aware UTC datetime of `to_micros`."""
    return _EPOCH + timedelta(microseconds=value)


def clamp_limit(limit: int) -> int:
    """The page size a backend serves: the default for zero or less, capped at MAX_LIST_LIMIT."""
    if limit <= 0:
        return 50
    return min(limit, MAX_LIST_LIMIT)


def page_token(record: TraceRecord) -> str:
    """The opaque token of the page after `record` (the last trace of a page)."""
    raw = f"{to_micros(record.created_at)}:{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_page_token(token: str) -> tuple[datetime, str]:
    """The `TraceQuery.before` cursor of a `page_token`; ValueError when malformed."""
    try:
        padded = token + "=" * (-len(token) % 4)
        micros, _, trace_id = base64.urlsafe_b64decode(padded.encode()).decode().partition(":")
        if not trace_id:
            raise ValueError("no trace id")
        return from_micros(int(micros)), trace_id
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError("malformed page token") from exc


class RateLimitedLog:
    """Logs a warning at most once per `interval` seconds per key, counting what it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            message += " (%d similar warnings suppressed)"
            args = (*args, held)
        self._logger.warning(message, *args)
