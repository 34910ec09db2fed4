"""CPU cost of the metric updates one request makes (`python -m bench.metrics_bench`).

One unary Create updates: the RPC scope (in-flight gauge up and down, the requests counter) and
the finished trace's histograms (duration, input and output tokens). A stream adds the
time-to-first-chunk histogram. Measured single-process and in multiprocess mode (--workers N,
memory-mapped files), a flush of the batched cells included every 1,000 requests, against a
budget of about 3% of the ~340 us a forwarded request costs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

BUDGET_US = 10.0  # about 3% of a forwarded request's CPU (architecture.md: ~340 us)
N = 200_000

_CHILD = r"""
import time
from datetime import UTC, datetime
from server import metrics
from server.traces.base import TraceRecord

metrics.configure(max_models=50)

class Ctx:
    def code(self):
        return None

record = TraceRecord(id="t", created_at=datetime.now(UTC), model="gpt-4o-mini", model_endpoint_type="openai",
                     latency_ms=123.0, prompt_tokens=120, completion_tokens=30, time_to_first_token_ms=45.0)
ctx = Ctx()
N = int(__import__("sys").argv[1])
FLUSH_EVERY = 1000
for _ in range(2000):  # warm the caches
    with metrics.RequestScope("Create", "unary", ctx) as s:
        s.endpoint_type, s.model = "openai", "gpt-4o-mini"
    metrics.record_trace(record)
flush = getattr(metrics, "flush", lambda: None)  # batched cells: include their flush's cost
start = time.process_time()
for i in range(N):
    with metrics.RequestScope("Create", "unary", ctx) as s:
        s.endpoint_type, s.model = "openai", "gpt-4o-mini"
    metrics.record_trace(record)
    if i % FLUSH_EVERY == 0:
        flush()  # the server flushes once a second: every 1,000 requests is 1,000 requests/s
print((time.process_time() - start) / N * 1e6)
"""


def _measure(env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(N)], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    rows = [("single process", _measure(base))]
    with tempfile.TemporaryDirectory(prefix="llmgw-metrics-bench-") as path:
        rows.append(("multiprocess (--workers N)", _measure({**base, "PROMETHEUS_MULTIPROC_DIR": path})))
    print(f"{'mode':<28} {'us/request':>10} {'budget':>8}  verdict")
    for name, us in rows:
        verdict = "ok" if us <= BUDGET_US else "over budget"
        print(f"{name:<28} {us:>10.2f} {BUDGET_US:>8.1f}  {verdict}")


if __name__ == "__main__":
    main()
