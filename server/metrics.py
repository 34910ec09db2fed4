"""Prometheus metrics of the gateway: the metric objects and the one-line hooks that update them.

Names follow the OpenTelemetry GenAI conventions where one exists, in their Prometheus form
(`gen_ai.client.operation.duration` in seconds is `gen_ai_client_operation_duration_seconds`),
and `llmgw_*` for the rest. Label values are bounded: models beyond `LLMGW_METRICS_MAX_MODELS`
distinct ones (per process) and unknown endpoint types are folded into `other`, and no label
ever holds an id, a key or free text. Models whose calls all failed take at most half of that
budget (names nobody serves cannot use it up); the rest is for models that answered.

With `--workers N` the parent points `PROMETHEUS_MULTIPROC_DIR` at a directory of its own run
before it spawns the workers (`server.metrics_dir`), so every worker writes its values to memory-
mapped files there and the one admin listener (worker 0) scrapes them all with prometheus_client's
`MultiProcessCollector`. prometheus_client picks its value store when it is first imported; the
workers are spawned (fresh interpreters), so they see the variable from their first import.

The hooks cost a few microseconds per request (`python -m bench.metrics_bench`): a hot path
does a dict lookup and adds to an in-process cell; `flush()` (once a second, and before a
scrape) moves the sums into prometheus_client, one locked update per changed series.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.values import MutexValue

from server.inflight import cancel_status, current_call
from server.metrics_dir import MULTIPROC_ENV

if TYPE_CHECKING:
    from server.providers.http import HttpClient
    from server.traces.base import TraceRecord
    from server.traces.writer import TraceWriter

OTHER = "other"
DEFAULT_MAX_MODELS = 50
MAX_ORIGINS = 50
MAX_REASONS = 64
_MAX_LABEL_CHARS = 100
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The GenAI conventions' explicit bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
TTFC_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip

_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")

# Metrics live in a registry of their own (not prometheus_client's global one), so importing a
# library that registers metrics globally changes nothing here.
REGISTRY = CollectorRegistry(auto_describe=True)

OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "GenAI operation duration: one upstream call, first byte sent to the answer's end (retries included).",
    [*_GENAI, "error_type"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Number of input and output tokens used per upstream call, by gen_ai_token_type.",
    [*_GENAI, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Time from the upstream call's start to the first streamed chunk relayed (streams only).",
    list(_GENAI),
    buckets=TTFC_BUCKETS,
    registry=REGISTRY,
)
REQUESTS = Counter(
    "llmgw_requests",
    "gRPC calls of ChatCompletionService answered, by RPC, provider (endpoint type), model and status code.",
    ["rpc", "provider", "model", "code"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "llmgw_upstream_errors",
    "Upstream calls that failed, by provider and the ErrorInfo reason of the failure.",
    ["provider", "reason"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "llmgw_retries",
    "Upstream attempts retried, by the ErrorInfo reason of the failed attempt.",
    ["reason"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "llmgw_fallbacks",
    "Calls that moved on to a fallback deployment, by reason.",
    ["reason"],
    registry=REGISTRY,
)
COST = Counter(
    "llmgw_cost_usd",
    "Cost of upstream calls in US dollars, by provider and model.",
    ["provider", "model"],
    registry=REGISTRY,
)
UNPRICED = Counter(
    "llmgw_unpriced_calls",
    "Answers whose cost is unknown (a model with no price, or usage whose parts do not add up): "
    "never counted as 0 in llmgw_cost_usd.",
    ["provider", "model"],
    registry=REGISTRY,
)
LIMITS_REDIS_FAILURES = Counter(
    "llmgw_limits_redis_failures",
    "Limit admissions the shared counters (Redis) could not answer, by what the policy did: "
    "admitted (fail open, unchecked) or refused (fail closed, LIMITS_UNAVAILABLE).",
    ["outcome"],
    registry=REGISTRY,
)
LIMITS_SETTLES_DROPPED = Counter(
    "llmgw_limits_settles_dropped",
    "Usage corrections of limit counters dropped because Redis could not be reached.",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "llmgw_in_flight",
    "ChatCompletionService calls running now, by kind (unary or stream).",
    ["kind"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TRACE_QUEUE_DEPTH = Gauge(
    "llmgw_trace_queue_depth",
    "Traces waiting in a backend's lane (a batch in flight included).",
    ["backend"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TRACE_QUEUE_BYTES = Gauge(
    "llmgw_trace_queue_bytes",
    "Bytes the traces waiting in a backend's lane pin.",
    ["backend"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TRACES_WRITTEN = Counter("llmgw_traces_written", "Traces a backend stored.", ["backend"], registry=REGISTRY)
TRACES_DROPPED = Counter(
    "llmgw_traces_dropped",
    "Traces lost: queue overflow, retries exhausted, or shutdown timed out.",
    ["backend"],
    registry=REGISTRY,
)
TRACE_WRITE_FAILURES = Counter(
    "llmgw_trace_write_failures",
    "Failed batch writes (every retry counts).",
    ["backend"],
    registry=REGISTRY,
)
POOL_CONNECTIONS = Gauge(
    "llmgw_upstream_pool_connections",
    "Upstream HTTP connections open, by origin and state (idle or in_use).",
    ["origin", "state"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)


class _Fold:
    """Admits the first `limit` distinct values of a label; later ones are `other`."""

    __slots__ = ("_seen", "_unproven", "limit", "_lock")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._unproven = 0  # values admitted by a failed call
        self.limit = limit
        self._lock = threading.Lock()

    def __call__(self, value: str, *, proven: bool = True) -> str:
        """`value`'s label. A value first seen on a failed call (`proven` False) takes a place only
        while such values hold less than half the budget: made-up model names a caller sends, all
        failing, cannot fold every other tenant's real models into `other`, and a model whose
        calls all fail (a bad key) still has its name while there is room."""
        if value in self._seen:
            return value
        if not value:
            return ""
        if len(value) > _MAX_LABEL_CHARS or not value.isprintable():
            return OTHER
        with self._lock:
            if len(self._seen) >= self.limit or not (proven or self._unproven < self.limit // 2):
                return OTHER
            self._seen.add(value)
            self._unproven += not proven
        return value

    def settled(self, value: str, label: str) -> bool:
        """Whether `label` (given for `value`) stays `value`'s label, so a cell made with it may be
        cached: not a value folded only because its calls had not succeeded yet."""
        return (
            label != OTHER
            or value == OTHER
            or len(self._seen) >= self.limit
            or len(value) > _MAX_LABEL_CHARS
            or not value.isprintable()
        )

    def reset(self, limit: int) -> None:
        with self._lock:
            self._seen.clear()
            self._unproven = 0
            self.limit = limit


models = _Fold(DEFAULT_MAX_MODELS)
_origins = _Fold(MAX_ORIGINS)
_reasons = _Fold(MAX_REASONS)
_known_providers: frozenset[str] = frozenset()


def configure(*, max_models: int) -> None:
    """Set the model label budget (LLMGW_METRICS_MAX_MODELS); called once per server start."""
    global _known_providers
    from server.core.validation import KNOWN_TYPES

    _known_providers = frozenset(KNOWN_TYPES)
    if models.limit != max_models:
        models.reset(max_models)


def provider_label(endpoint_type: str) -> str:
    """An endpoint type as a label: a known one as is, anything else (a client's typo) `other`."""
    if endpoint_type in _known_providers or not endpoint_type:
        return endpoint_type
    return OTHER


def _reason(reason: str) -> str:
    return _reasons(reason)


# -- the hooks ---------------------------------------------------------------------------------
#
# The hot hooks (every call's requests counter, in-flight gauge, duration/token/TTFC histograms,
# and, in a single process, the cost and unpriced counters: with workers those are written at
# each answer)
# add to plain in-process cells, and `flush()` moves the sums into the prometheus_client objects:
# once a second (the Sampler), before this process renders a scrape, and when the server stops.
# In multiprocess mode (--workers N) each prometheus_client update takes a lock and writes a
# memory-mapped file; a cell's update is a float add. So a scrape sees this process's counts
# exactly and the other workers' as of their last flush (at most a second old). All hooks run
# on the event loop's thread, as does `flush()`: the cells need no lock.


class _CounterCell:
    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


class _HistogramCell:
    """Observations not yet in `child`: their sum and a count per bucket (prometheus_client's own
    per-bucket layout: `_buckets[i]` counts the values in (bound[i-1], bound[i]])."""

    __slots__ = ("child", "bounds", "counts", "total", "dirty")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: tuple[float, ...] = tuple(child._upper_bounds)  # noqa: SLF001 - ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False

    def observe(self, value: float) -> None:
        # The first bound >= value, as Histogram.observe picks it (NaN: none, as there).
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts) and value == value:
            self.counts[index] += 1
        self.total += value
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        counts, total = self.counts, self.total
        self.counts, self.total, self.dirty = [0] * len(self.bounds), 0.0, False
        self.child._sum.inc(total)  # noqa: SLF001 - what Histogram.observe does, summed
        buckets = self.child._buckets  # noqa: SLF001
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)


class _GaugeCell:
    """This process's value of a gauge (in-flight calls), set into `child` at each flush."""

    __slots__ = ("child", "value", "flushed")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = 0
        self.flushed = 0

    def flush(self) -> None:
        if self.value != self.flushed:
            self.flushed = self.value
            self.child.set(self.value)


_PICO_PER_DOLLAR = 10**12


class _CostCell:
    """The exact sum of one cost series in integer pico-dollars (see `record_cost`); each flush
    that finds it changed sets the counter to the float nearest it."""

    __slots__ = ("value", "pico", "flushed", "shared")

    def __init__(self, child: Any) -> None:
        # prometheus_client has no public set() on a counter; its value object (in-process, or
        # memory-mapped with workers) has one. tests/integration/test_money_review.py checks it.
        self.value = child._value  # noqa: SLF001
        self.pico = 0
        self.flushed = 0
        # With workers the value is in a file other workers' scrapes read: written at each answer
        # (`record_cost`), so a scrape sees every worker's cost and a worker that dies loses none.
        self.shared = not isinstance(self.value, MutexValue)

    def flush(self) -> None:
        if self.pico != self.flushed:
            self.flushed = self.pico
            self.value.set(self.pico / _PICO_PER_DOLLAR)  # int / int: correctly rounded


# Every cell, by metric and (folded) label values: bounded by the labels' own bounds.
_cells: dict[tuple[object, tuple[str, ...]], _CounterCell | _HistogramCell | _GaugeCell | _CostCell] = {}


def _cell(metric: Any, labels: tuple[str, ...], kind: type[Any]) -> Any:
    key = (metric, labels)
    cell = _cells.get(key)
    if cell is None:
        cell = _cells[key] = kind(metric.labels(*labels))
    return cell


def flush() -> None:
    """Moves every cell's pending counts into the metrics (and, with workers, their files)."""
    for cell in list(_cells.values()):
        cell.flush()


# kind ("unary", "stream": the servicers' constants) -> its IN_FLIGHT cell, for RequestScope,
# made on every call: one lookup by a str, without the (metric, labels) key `_cell` builds.
_in_flight_cells: dict[str, _GaugeCell] = {}


def _in_flight_cell(kind: str) -> _GaugeCell:
    cell = _in_flight_cells.get(kind)
    if cell is None:
        cell = _in_flight_cells[kind] = _cell(IN_FLIGHT, (kind,), _GaugeCell)
    return cell


# Raw (unfolded) label values -> cells; capped, beyond which a call folds its labels again.
_request_cells: dict[tuple[str, str, str, str], _CounterCell] = {}
_call_cells: dict[
    tuple[str, str, str], tuple[_HistogramCell, _HistogramCell, _HistogramCell, _HistogramCell]
] = {}
_MAX_CACHED = 10_000


def record_request(rpc: str, endpoint_type: str, model: str, code: str, *, proves: bool = True) -> None:
    """One ChatCompletionService call answered with status `code` (e.g. "OK", "UNAVAILABLE").

    `proves` False: an OK is no proof that `model` answered (CountTokens calls no upstream; a
    routed call's answer may come from another deployment), so a model first seen on such a
    call takes a place only as one first seen on a failed call does."""
    key = (rpc, endpoint_type, model, code)
    cell = _request_cells.get(key)
    if cell is None:
        model_label = models(model, proven=proves and code == "OK")
        labels = (rpc, provider_label(endpoint_type), model_label, code)
        cell = _cell(REQUESTS, labels, _CounterCell)
        if len(_request_cells) < _MAX_CACHED and models.settled(model, model_label):
            _request_cells[key] = cell
    cell.pending += 1.0


def record_refused(rpc: str) -> None:
    """One ChatCompletionService call the draining server refused (UNAVAILABLE SHUTTING_DOWN)
    before its servicer ran: counted as a call refused before its request was parsed is, with
    empty provider and model (server.inflight refuses it, outside any RequestScope)."""
    record_request(rpc, "", "", "UNAVAILABLE", proves=False)


# Failures that are the caller's or the server's doing, not the upstream's (server.inflight).
_NOT_UPSTREAM = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "SHUTTING_DOWN"})


def record_trace(record: TraceRecord) -> None:
    """One upstream call finished (its trace is complete): duration, tokens, TTFC, error."""
    endpoint_type, model, error_type = record.model_endpoint_type, record.model, record.error_type
    key = (endpoint_type, model, error_type)
    cells = _call_cells.get(key)
    if cells is None:
        model_label = models(model, proven=not error_type)
        labels = ("chat", provider_label(endpoint_type), model_label)
        error_label = _reason(error_type) if error_type else ""
        cells = (
            _cell(OPERATION_DURATION, (*labels, error_label), _HistogramCell),
            _cell(TOKEN_USAGE, (*labels, "input"), _HistogramCell),
            _cell(TOKEN_USAGE, (*labels, "output"), _HistogramCell),
            _cell(TIME_TO_FIRST_CHUNK, labels, _HistogramCell),
        )
        if len(_call_cells) < _MAX_CACHED and models.settled(model, model_label):
            _call_cells[key] = cells
    duration, tokens_in, tokens_out, first_chunk = cells
    duration.observe(record.latency_ms / 1000.0)
    if error_type:
        if error_type not in _NOT_UPSTREAM:
            UPSTREAM_ERRORS.labels(provider_label(endpoint_type), _reason(error_type)).inc()
    else:
        # As floats: the bounds are floats, and bisecting with an int compares int to float at
        # each step (~700 instructions more an observation). Token counts are int32 (Usage):
        # exact as floats, so each lands in the same bucket and adds the same to the sum.
        tokens_in.observe(float(record.prompt_tokens))
        tokens_out.observe(float(record.completion_tokens))
    if record.time_to_first_token_ms > 0:
        first_chunk.observe(record.time_to_first_token_ms / 1000.0)


def record_retry(reason: str) -> None:
    """One failed upstream attempt that will be retried."""
    RETRIES.labels(_reason(reason)).inc()


def record_fallback(reason: str) -> None:
    """One call moved on to a fallback deployment (the routing code calls this)."""
    FALLBACKS.labels(_reason(reason)).inc()


# (provider, model) -> its labels' cell (models folded into `other` share one); capped, beyond
# which a call folds its labels again.
_cost_cells: dict[tuple[str, str], _CostCell] = {}


def record_cost(provider: str, model: str, pico: int) -> None:
    """Cost of one upstream call in integer pico-dollars (`server.billing.meter` calls this).

    Adding each call's cost as a float would drift (0.0085 + 0.017 is not 0.0255 in binary), so
    the exact sum is kept as an integer per label set (a `_CostCell`) and `flush()` sets the
    counter to the float nearest it (int / int is correctly rounded): /metrics says the exact sum
    of the answers' `cost_usd`, to the last bit a float holds. With `--workers N` each worker's
    value is exact (written at each answer, not at a flush) and the scrape adds them up.
    """
    if pico <= 0:
        return
    key = (provider, model)
    cell = _cost_cells.get(key)  # every priced answer: one lookup
    if cell is None:
        cell = _cell(COST, (provider_label(provider), models(model)), _CostCell)
        if len(_cost_cells) < _MAX_CACHED:
            _cost_cells[key] = cell
    cell.pico += pico
    if cell.shared:  # --workers: in the file now, as before the cells (see _CostCell)
        cell.flush()


def record_unpriced(provider: str, model: str) -> None:
    """One answer whose cost is unknown (with workers in this worker's file at once, as the cost
    is: see _CostCell)."""
    cell = _cell(UNPRICED, (provider_label(provider), models(model)), _CounterCell)
    cell.pending += 1.0
    if not isinstance(cell.child._value, MutexValue):  # noqa: SLF001 - memory-mapped: --workers
        cell.flush()


def record_limits_redis_failure(*, admitted: bool) -> None:
    LIMITS_REDIS_FAILURES.labels("admitted" if admitted else "refused").inc()


def record_limits_settles_dropped(count: int) -> None:
    LIMITS_SETTLES_DROPPED.inc(count)


@contextlib.contextmanager
def in_flight(kind: str) -> Iterator[None]:
    """Counts a ChatCompletionService call as running while the block runs."""
    cell = _in_flight_cell(kind)
    cell.value += 1
    try:
        yield
    finally:
        cell.value -= 1


# -- sampled state (no cost on the request path) ---------------------------------------------


class Sampler:
    """Copies the trace lanes' and the HTTP pool's state into metrics, once a second.

    A background task rather than a scrape-time collector: with several workers each worker's
    values must be in its own files for worker 0's scrape to see them. Counters of the lanes
    advance by the difference since the last sample, so they stay counters.
    """

    def __init__(self, writer: TraceWriter, http: HttpClient, *, interval: float = 1.0) -> None:
        self._writer = writer
        self._http = http
        self._interval = interval
        self._seen: dict[tuple[str, str], int] = {}
        self._origins: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        flush()  # the request path's pending counts
        for stats in self._writer.stats:
            name = stats.backend
            TRACE_QUEUE_DEPTH.labels(name).set(stats.queued)
            TRACE_QUEUE_BYTES.labels(name).set(stats.queued_bytes)
            for counter, value, field in (
                (TRACES_WRITTEN, stats.written, "written"),
                (TRACES_DROPPED, stats.dropped, "dropped"),
                (TRACE_WRITE_FAILURES, stats.failed_batches, "failed"),
            ):
                previous = self._seen.get((name, field), 0)
                if value > previous:
                    counter.labels(name).inc(value - previous)
                self._seen[(name, field)] = value
        totals: dict[tuple[str, str], int] = {}
        for (origin, state), count in self._http.pool_sizes().items():
            label = (_origins(origin), state)
            totals[label] = totals.get(label, 0) + count
        for label in self._origins - set(totals):
            POOL_CONNECTIONS.labels(*label).set(0)  # that origin's connections all closed
        for label, count in totals.items():
            POOL_CONNECTIONS.labels(*label).set(count)
        self._origins |= set(totals)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmgw-metrics-sampler")

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sample()  # the last counts (a final flush's written traces) reach the files


# -- exposition --------------------------------------------------------------------------------


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render() -> bytes:
    """The text exposition of every metric: all workers' when several run, this process's else
    (this process's pending counts flushed first; another worker's as of its last flush)."""
    flush()
    if multiprocess_enabled():
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    return bytes(generate_latest(REGISTRY))


def mark_process_dead(pid: int) -> None:
    """Drops a worker's live gauges (in-flight, queue depth) once it exited."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        _multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# -- the RPC scope -----------------------------------------------------------------------------

_CODE_NAMES: dict[object, str] = {code.value[0]: code.name for code in grpc.StatusCode}
_CODE_NAMES.update({code: code.name for code in grpc.StatusCode})


class RequestScope:
    """One ChatCompletionService call: in flight while inside, counted by status code at the end.

    The servicer sets `endpoint_type` and `model` once the request is parsed (a call refused
    before that, e.g. UNAUTHENTICATED, counts with empty ones). The code is the one the call's
    abort set on the context; a call that ended without one (cancelled) counts with the status
    its caller receives, as server.inflight tells why it was cut: UNAVAILABLE if shutdown cut it
    (its SHUTTING_DOWN status is sent after this scope ends), DEADLINE_EXCEEDED if its deadline
    passed, CANCELLED if its caller cancelled it.
    A plain class, not a generator-based context manager: this is on every call's path.
    """

    __slots__ = ("_rpc", "_gauge", "_context", "endpoint_type", "model", "proves")

    def __init__(self, rpc: str, kind: str, context: Any) -> None:
        self._rpc = rpc
        gauge = _in_flight_cells.get(kind)  # the usual case inline: no call
        self._gauge = gauge if gauge is not None else _in_flight_cell(kind)
        self._context = context
        self.endpoint_type = ""
        self.model = ""
        self.proves = True

    def labels(self, config: Any, *, proves: bool = True) -> None:
        """The provider and model labels, from the request's LLMConfig. `proves` False: an OK of
        this call does not show that this model answered (see `record_request`)."""
        self.endpoint_type = config.model_endpoint_type
        self.model = config.model
        self.proves = proves

    def __enter__(self) -> RequestScope:
        self._gauge.value += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._gauge.value -= 1
        if exc is None:
            code = "OK"
        else:
            try:
                raw = self._context.code()
            except Exception:  # noqa: BLE001 - a context without a code: say so rather than fail
                raw = None
            code = cancel_status(current_call()) if raw is None else _CODE_NAMES.get(raw, "UNKNOWN")
        # record_request's cached case inline (every call after a label set's first): no call.
        cell = _request_cells.get((self._rpc, self.endpoint_type, self.model, code))
        if cell is not None:
            cell.pending += 1.0
        else:
            record_request(self._rpc, self.endpoint_type, self.model, code, proves=self.proves)
