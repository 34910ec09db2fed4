"""Drive `bench.loadgen` processes and measure the targets' CPU time while they run."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoadResult:
    requests: int
    errors: int
    wall: float
    latencies_us: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # watched name -> CPU seconds during the run
    client_cpu: float = 0.0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.wall if self.wall > 0 else 0.0

    def percentile(self, q: float) -> float:
        data = self.latencies_us
        if not data:
            return float("nan")
        index = min(len(data) - 1, max(0, round(q / 100.0 * len(data)) - 1))
        return data[index]

    def cpu_per_request_us(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.requests * 1e6 if self.requests else float("nan")


def run(
    *,
    protocol: str,
    target: str,
    body: bytes,
    requests: int,
    concurrency: int,
    processes: int = 1,
    connections: int = 4,
    method: str = "Create",
    rate: float = 0.0,
    expect_messages: int = 0,
    warmup: int = 5,
    cpus: Sequence[int] | None = None,
    watch: dict[str, int] | None = None,
    workdir: Path,
    settle: float = 0.3,
    bearer: str = "sk-bench",
    headers: Sequence[str] = (),
) -> LoadResult:
    """Start `processes` load generators, let them warm up, then measure `requests` requests."""
    watch = watch or {}
    processes = max(1, min(processes, concurrency))
    body_path = workdir / f"body-{protocol}-{method}-{abs(hash(body))}.bin"
    body_path.write_bytes(body)
    children = []
    for i in range(processes):
        share = requests // processes + (1 if i < requests % processes else 0)
        conc = concurrency // processes + (1 if i < concurrency % processes else 0)
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--protocol",
            protocol,
            "--target",
            target,
            "--method",
            method,
            "--body",
            str(body_path),
            "--requests",
            str(share),
            "--concurrency",
            str(conc),
            "--connections",
            str(connections),
            "--rate",
            str(rate / processes if rate else 0.0),
            "--warmup",
            str(warmup),
            "--expect-messages",
            str(expect_messages),
            "--latencies",
            str(workdir / f"lat-{i}.bin"),
            "--bearer",
            bearer,
            *(arg for header in headers for arg in ("--header", header)),
        ]
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        children.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
                text=True,
            )
        )
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                _, err = child.communicate(timeout=30)
                raise RuntimeError(f"load generator failed to start: {line}{err[-3000:]}")
        before = {name: procs.cpu_seconds(pid) for name, pid in watch.items()}
        t0 = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = []
        for child in children:
            out, err = child.communicate(timeout=3600)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if child.returncode != 0 or not lines:
                raise RuntimeError(f"load generator failed ({child.returncode}): {err[-3000:]}")
            outputs.append(json.loads(lines[-1]))
        wall = time.perf_counter() - t0
        # Traces are written in the background: let the last batch land before reading CPU.
        time.sleep(settle)
        after = {name: procs.cpu_seconds(pid) for name, pid in watch.items()}
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    latencies = array("d")
    for i in range(processes):
        path = workdir / f"lat-{i}.bin"
        with open(path, "rb") as f:
            latencies.frombytes(f.read())
        path.unlink()
    walls = [o["wall"] for o in outputs]
    return LoadResult(
        requests=sum(o["requests"] for o in outputs),
        errors=sum(o["errors"] + o["warmup_errors"] for o in outputs),
        wall=max(walls) if walls else wall,
        latencies_us=sorted(latencies),
        cpu={name: after[name] - before[name] for name in watch},
        client_cpu=sum(o["cpu"] for o in outputs),
        first_error=next((o["first_error"] for o in outputs if o["first_error"]), ""),
    )


def h2load_path() -> str | None:
    """h2load (Debian `nghttp2-client`), the cheapest gRPC load there is, when installed."""
    return shutil.which("h2load")


def run_h2load(
    *,
    target: str,
    method: str,
    body: bytes,
    requests: int,
    concurrency: int,
    connections: int = 4,
    cpus: Sequence[int] | None = None,
    watch: dict[str, int] | None = None,
    workdir: Path,
    warmup: int = 500,
    settle: float = 0.3,
) -> LoadResult:
    """Saturate a gRPC server with h2load: `connections` HTTP/2 connections, `concurrency` streams in all.

    h2load counts HTTP statuses, not grpc-status: callers check success another way (the
    gateway's traces record every error). It reports no percentiles, so no latencies here.
    """
    exe = h2load_path()
    if exe is None:
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    watch = watch or {}
    framed = workdir / f"body-{method}.grpc"
    framed.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
    connections = max(1, min(connections, concurrency))
    streams = max(1, concurrency // connections)
    url = f"http://{target}/llmgateway.v1.ChatCompletionService/{method}"

    def once(n: int) -> tuple[str, float]:
        argv = [exe, "-n", str(n), "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(framed),
                "-H", "content-type: application/grpc", "-H", "te: trailers", url]  # fmt: skip
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert child.stdout is not None
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"h2load failed ({child.returncode}): {out[-2000:]}")
        return out, usage.ru_utime + usage.ru_stime

    once(max(warmup, connections))
    before = {name: procs.cpu_seconds(pid) for name, pid in watch.items()}
    out, client_cpu = once(requests)
    time.sleep(settle)
    after = {name: procs.cpu_seconds(pid) for name, pid in watch.items()}
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    counts = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    if not finished or not counts:
        raise RuntimeError(f"cannot read h2load's output:\n{out[-2000:]}")
    wall = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    done, ok = int(counts.group(2)), int(counts.group(3))
    return LoadResult(
        requests=done,
        errors=done - ok + (requests - done),
        wall=wall,
        latencies_us=[],
        cpu={name: after[name] - before[name] for name in watch},
        client_cpu=client_cpu,
        first_error="" if ok == done else out[-500:],
    )
