"""Streams held at once: N concurrent paced StreamCreate calls, the server's CPU, memory and fds.

The client is `bench/held_client.mjs` (Node's http2: a Python gRPC client would cost more per
message than the server it measures). While it runs, the server's RSS is sampled every 0.2 s
(the peak is kept) and its open file descriptors are counted once every stream is open.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import procs

CLIENT = Path(__file__).resolve().parent / "held_client.mjs"


@dataclass
class HeldResult:
    streams: int
    ok: int
    failed: int
    first_error: str
    chunks: int
    wall: float
    cpu: float  # server CPU seconds over the run
    client_cpu: float
    rss_before: int
    rss_peak: int
    rss_after: int
    fds_before: int
    fds_held: int  # once every stream had its first chunk (the peak, if that never happened)
    p50_us: float
    p99_us: float
    max_us: float
    # Server cores between every stream being open and the first one ending: all relaying, no
    # stream starting or ending (nan when that window was not seen).
    steady_cores: float = float("nan")
    # Inter-chunk delay over that same window (nan when it was not seen).
    steady_chunks: int = 0
    steady_p50_us: float = float("nan")
    steady_p99_us: float = float("nan")

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall else float("nan")

    @property
    def cpu_per_chunk_us(self) -> float:
        return self.cpu / self.chunks * 1e6 if self.chunks else float("nan")

    @property
    def rss_per_stream(self) -> float:
        return (self.rss_peak - self.rss_before) / self.streams if self.streams else float("nan")


def node_path() -> str | None:
    return shutil.which("node")


def fd_count(pid: int) -> int:
    total = 0
    for p in procs.tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def run(
    *,
    target: str,
    body: bytes,
    streams: int,
    chunks: int,
    server_pid: int,
    workdir: Path,
    cpus: Sequence[int] | None = None,
    per_connection: int = 100,
    ramp_s: float = 1.0,
    timeout_s: float = 600.0,
    settle_s: float = 1.0,
) -> HeldResult:
    node = node_path()
    if node is None:
        raise RuntimeError("node is not installed (the held-streams client is a Node script)")
    body_path = workdir / f"held-body-{abs(hash(body))}.bin"
    body_path.write_bytes(body)
    options = {
        "target": target,
        "body": str(body_path),
        "streams": streams,
        "per_connection": per_connection,
        "ramp_s": ramp_s,
        "expect_chunks": chunks,
        "timeout_s": timeout_s,
    }
    argv = [node, str(CLIENT), json.dumps(options)]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    rss_before = procs.rss_bytes(server_pid)
    fds_before = fd_count(server_pid)
    cpu_before = procs.cpu_seconds(server_pid)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    peak, fds_held, fds_peak, result = rss_before, 0, 0, None
    held_at: tuple[float, float] | None = None
    steady_cores = float("nan")
    buffered = b""
    deadline = time.monotonic() + timeout_s + 30
    try:
        while result is None and time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], 0.2)
            peak = max(peak, procs.rss_bytes(server_pid))
            fds_peak = max(fds_peak, fd_count(server_pid))
            if not ready and child.poll() is None:
                continue
            # Readable, or the client exited (what it wrote before exiting is still in the pipe).
            data = os.read(child.stdout.fileno(), 65536)
            if not data:
                break
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if line.strip() == b"held":
                    held_at = (time.monotonic(), procs.cpu_seconds(server_pid))
                    fds_held = fd_count(server_pid)
                elif line.strip() == b"ending" and held_at is not None:
                    wall, cpu = time.monotonic() - held_at[0], procs.cpu_seconds(server_pid) - held_at[1]
                    steady_cores = cpu / wall if wall > 0.2 else float("nan")
                elif line.startswith(b"{"):
                    result = json.loads(line)
        cpu_after = procs.cpu_seconds(server_pid)
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate(timeout=30)
    if result is None:
        raise RuntimeError(f"held-streams client failed ({child.returncode}): {err.decode()[-3000:]}")
    time.sleep(settle_s)  # the last traces, buffers freed
    return HeldResult(
        streams=streams,
        ok=int(result["ok"]),
        failed=int(result["failed"]),
        first_error=str(result["first_error"]),
        chunks=int(result["chunks"]),
        wall=float(result["wall"]),
        cpu=cpu_after - cpu_before,
        client_cpu=float(result["cpu"]),
        rss_before=rss_before,
        rss_peak=peak,
        rss_after=procs.rss_bytes(server_pid),
        fds_before=fds_before,
        fds_held=fds_held or fds_peak,
        p50_us=float(result["p50_us"] or "nan"),
        p99_us=float(result["p99_us"] or "nan"),
        max_us=float(result["max_us"] or "nan"),
        steady_cores=steady_cores,
        steady_chunks=int(result.get("steady_chunks") or 0),
        steady_p50_us=float(result.get("steady_p50_us") or "nan"),
        steady_p99_us=float(result.get("steady_p99_us") or "nan"),
    )
