"""The metrics' in-process cells: after a flush the exposition equals direct prometheus_client
updates, bucket by bucket (this guards the cells' use of Histogram's per-bucket values)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server import metrics

VALUES = (0.0, 0.01, 0.0100001, 0.5, 1.28, 3.0, 81.92, 100.0, 1e9, -1.0)


def test_a_flushed_histogram_cell_equals_direct_observations() -> None:
    registry = CollectorRegistry()
    direct = Histogram("d", "d", ["x"], buckets=metrics.DURATION_BUCKETS, registry=registry)
    batched = Histogram("b", "b", ["x"], buckets=metrics.DURATION_BUCKETS, registry=registry)
    cell = metrics._HistogramCell(batched.labels("a"))  # noqa: SLF001
    for value in VALUES:
        direct.labels("a").observe(value)
        cell.observe(value)
    assert 'b_count{x="a"} 0.0' in generate_latest(registry).decode()  # pending until the flush
    cell.flush()
    text = generate_latest(registry).decode()
    lines_d = sorted(
        line[1:] for line in text.splitlines() if line.startswith("d_") and "created" not in line
    )
    lines_b = sorted(
        line[1:] for line in text.splitlines() if line.startswith("b_") and "created" not in line
    )
    assert lines_d == lines_b and len(lines_d) == len(metrics.DURATION_BUCKETS) + 3
    cell.flush()  # nothing pending: nothing added twice
    assert generate_latest(registry).decode().count('b_count{x="a"} 10.0') == 1
    assert not math.isnan(cell.total)


_CHILD = r"""
import sys
from datetime import UTC, datetime
from server import metrics
from server.traces.base import TraceRecord
metrics.configure(max_models=50)
record = TraceRecord(id="t", created_at=datetime.now(UTC), model="m", model_endpoint_type="openai",
                     latency_ms=123.0, prompt_tokens=120, completion_tokens=30, time_to_first_token_ms=45.0)
for _ in range(int(sys.argv[1])):
    with metrics.RequestScope("Create", "unary", None) as scope:
        scope.endpoint_type, scope.model = "openai", "m"
    metrics.record_trace(record)
if sys.argv[2] == "flush":
    metrics.flush()
"""


def _worker(directory: Path, calls: int, mode: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", _CHILD, str(calls), mode], env=env, check=True)


def test_multiprocess_scrape_sums_each_workers_flushed_cells(tmp_path: Path) -> None:
    _worker(tmp_path, 7, "flush")
    _worker(tmp_path, 5, "flush")
    _worker(tmp_path, 3, "no-flush")  # a process that never flushed: its counts are not in the files
    script = (
        "from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
        "r = CollectorRegistry(); multiprocess.MultiProcessCollector(r)\n"
        "print(generate_latest(r).decode())"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    text = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert 'llmgw_requests_total{code="OK",model="m",provider="openai",rpc="Create"} 12.0' in text
    count = (
        'gen_ai_client_operation_duration_seconds_count{error_type="",gen_ai_operation_name="chat",'
        'gen_ai_provider_name="openai",gen_ai_request_model="m"} 12.0'
    )
    assert count in text
    assert count.replace("_count{", "_bucket{").replace('="m"}', '="m",le="0.16"}') in text


def _requests(rpc: str, model: str, code: str) -> float:
    metrics.flush()
    for family in metrics.REQUESTS.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and (labels["rpc"], labels["model"], labels["code"]) == (
                rpc,
                model,
                code,
            ):
                return sample.value
    return 0.0


class _Failed:
    def code(self) -> object:
        import grpc

        return grpc.StatusCode.UNAVAILABLE


def test_request_scope_counts_as_record_request_does_cached_or_not() -> None:
    """RequestScope adds to a cached cell itself and leaves the rest to record_request: the first
    call of a label set (not cached yet), the later ones (cached), a failed call, and a model
    folded into `other` all count once each, under the labels record_request gives them."""
    rpc = "ScopeCountsTest"
    before = _requests(rpc, "scope-model", "OK")
    for _ in range(3):
        with metrics.RequestScope(rpc, "unary", None) as scope:
            scope.endpoint_type, scope.model = "openai", "scope-model"
    assert _requests(rpc, "scope-model", "OK") == before + 3
    assert (rpc, "openai", "scope-model", "OK") in metrics._request_cells  # noqa: SLF001 - the inline path ran
    failed_before = _requests(rpc, "scope-model", "UNAVAILABLE")
    for _ in range(2):
        try:
            with metrics.RequestScope(rpc, "unary", _Failed()) as scope:
                scope.endpoint_type, scope.model = "openai", "scope-model"
                raise RuntimeError("failed")
        except RuntimeError:
            pass
    assert _requests(rpc, "scope-model", "UNAVAILABLE") == failed_before + 2
    too_long = "x" * 500  # too long for a label: counted as `other`, cached by its raw value
    other_before = _requests(rpc, metrics.OTHER, "OK")
    for _ in range(2):
        with metrics.RequestScope(rpc, "unary", None) as scope:
            scope.endpoint_type, scope.model = "openai", too_long
    assert _requests(rpc, metrics.OTHER, "OK") == other_before + 2
    assert metrics._in_flight_cell("unary").value == 0  # noqa: SLF001 - every scope left the gauge


def test_token_counts_land_where_prometheus_puts_them() -> None:
    """record_trace observes token counts as floats: on every bucket bound, either side of it, and
    at int32's ends, the buckets and the sum equal prometheus_client's own Histogram fed ints."""
    from datetime import UTC, datetime

    from server.traces.base import TraceRecord

    counts = [0, 2**31 - 1]
    for bound in metrics.TOKEN_BUCKETS:
        counts += [bound - 1, bound, bound + 1]
    registry = CollectorRegistry()
    direct = Histogram("d", "d", ["x"], buckets=metrics.TOKEN_BUCKETS, registry=registry)
    model = "token-bucket-test-model"
    for count in counts:
        direct.labels("a").observe(count)
        record = TraceRecord(
            id="t", created_at=datetime.now(UTC), model=model, model_endpoint_type="openai",
            prompt_tokens=count, completion_tokens=count,
        )  # fmt: skip
        metrics.record_trace(record)
    metrics.flush()

    def samples(metric: Histogram, prefix: str, **labels: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(prefix), s.labels.get("le", "")): s.value
            for s in metric.collect()[0].samples
            if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")
        }

    expected = samples(direct, "d", x="a")
    assert expected[("_count", "")] == len(counts)
    for token_type in ("input", "output"):
        got = samples(
            metrics.TOKEN_USAGE,
            "gen_ai_client_token_usage",
            gen_ai_request_model=model,
            gen_ai_token_type=token_type,
        )
        assert got == expected, token_type


_COST_CHILD = r"""
from server import metrics
metrics.configure(max_models=50)
for _ in range(3):
    metrics.record_cost("openai", "priced", 10_000_000_000)  # $0.01 each
    metrics.record_unpriced("openai", "unpriced")
"""  # and the process ends without a flush: a worker that died (a crash, a kill, the OOM killer)


def test_a_workers_cost_and_unpriced_counts_are_in_its_files_without_a_flush(tmp_path: Path) -> None:
    """With workers the cost and unpriced counters are written at each answer, as before the cells:
    another worker's scrape sees them at once, and a worker that dies before a flush loses none."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _COST_CHILD], env=env, check=True)
    script = (
        "from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
        "r = CollectorRegistry(); multiprocess.MultiProcessCollector(r)\n"
        "print(generate_latest(r).decode())"
    )
    text = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert 'llmgw_cost_usd_total{model="priced",provider="openai"} 0.03' in text
    assert 'llmgw_unpriced_calls_total{model="unpriced",provider="openai"} 3.0' in text
