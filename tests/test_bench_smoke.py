"""`python -m bench --quick` runs end to end and prints the whole table (timings are never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROWS = (
    "CPU per unary request",
    "CPU per 50-chunk stream",
    "of which bare grpc.aio (floor",
    "bare grpc.aio sending 51 messages",
    "bare stream relay: grpc.aio + aiohttp",
    "CPU per unary request / bare aiohttp forwarder",
    "CPU per 50-chunk stream / bare aiohttp stream forwarder",
    "bare forwarder of streams: grpc.aio + aiohttp, a message per chunk",
    "CPU per unary request, Anthropic (vs OpenAI path)",
    "CPU per 50-chunk stream, Anthropic (vs OpenAI path)",
    "CPU per paced 50-chunk stream",
    "CPU per relayed chunk (paced)",
    "bare grpc.aio relay, per paced chunk (floor)",
    "held 20 streams (20 chunks, 20 ms apart): CPU",
    "floor (bare grpc.aio relay), 20 held",
    "held 20 streams: RSS per held stream",
    "held 20 streams: file descriptors while held",
    "held 20 streams: added inter-chunk delay p50",
    "held 20 streams: added inter-chunk delay p99",
    "held 20 streams: streams complete",
    "held 40 streams: streams complete",
    "held 20 streams, 50 ms apart (below saturation): CPU",
    "floor (bare grpc.aio relay), 20 held 50 ms apart",
    "held 20 streams, 50 ms apart (below saturation): added inter-chunk delay p99",
    "held 20 streams, 50 ms apart (below saturation): streams complete",
    "RSS 20 held: before -> peak -> after -> 2nd round's peak -> after",
    "bare forwarder: grpc.aio + aiohttp",
    "bare forwarder: grpc.aio + the gateway's HTTP client",
    "CPU per unary request vs the budget scaled to this machine",
    "throughput, 1 worker, unary",
    "throughput, 1 worker, streams",
    "added latency c=1 p50 (unary)",
    "added latency c=1 p99 (unary)",
    "added latency c=32 p50",
    "added latency c=32 p99",
    "added latency c=1 p50 (50-chunk stream",
    "direct upstream latency c=1",
    "throughput, 2 workers, unary",
    "scaling 1 -> 2 workers",
    "CPU per unary request, 2 workers",
    "projected scaling with 2 free cores",
    "RSS before -> after",
    "SQLite trace writer (traces/s)",
    "traces dropped by the writer",
    "upstream CPU per request",
    "load generator CPU per request",
)


# ~45 s on an idle machine; a generous bound, as a loaded shared machine has taken 4-5 minutes.
@pytest.mark.timeout(600)
def test_quick_benchmark_prints_every_row(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workdir", str(tmp_path / "bench")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("llm-gateway benchmark"), result.stdout
    assert lines[1].split("|")[0].strip() == "metric", result.stdout
    table = [line.split("|")[0].strip() for line in lines[3:] if "|" in line]
    for row in ROWS:
        assert any(name.startswith(row) for name in table), f"missing row {row!r}:\n{result.stdout}"
    # Every request in the quick run succeeded: failures are reported as notes.
    assert "failed requests" not in result.stdout, result.stdout
    assert not re.search(r"held streams: \d+ failed", result.stdout), result.stdout
    # Every held stream got all its chunks and the assembled answer (the client checks both).
    for count in (20, 40):
        row = next(line for line in lines if line.startswith(f"held {count} streams: streams complete"))
        assert f"{count} / {count}" in row, row
    below = next(
        line for line in lines if line.startswith("held 20 streams, 50 ms apart (below saturation): streams")
    )
    assert "20 / 20" in below, below
