"""Issue 15, items 1 and 2, with real server processes.

- SO_REUSEPORT only with `--workers` > 1: a second server on a port another one holds (with one
  worker or with several) refuses to start, exit 2 and a message naming the address, and the
  first one keeps serving.
- `--workers 2`: a worker killed with SIGKILL is restarted by the parent (logged), the gateway
  keeps serving and exits 0 on SIGTERM; a worker that keeps crashing (killed `MAX_CRASHES` times
  within `CRASH_WINDOW`) makes the parent stop the others and exit 1.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from grpc_health.v1 import health_pb2

from server.supervisor import EXIT_CRASH_LOOP, MAX_CRASHES
from tests.integration.test_hardening_shutdown_review import alive, children, free_port
from tests.process_harness import REPO_ROOT, ServerProcess, clean_env, health_status, start_server_process

SERVING = health_pb2.HealthCheckResponse.SERVING


def run_second_server(tmp_path: Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """`serve` on a port already taken: it must exit by itself (the timeout fails the test)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--sqlite-path",
            str(tmp_path / "other.db"),
            *extra,
        ],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_server_on_a_taken_port_fails_to_start(tmp_path: Path) -> None:
    port = free_port()
    first = start_server_process(tmp_path, listen=f"127.0.0.1:{port}")
    try:
        second = run_second_server(tmp_path, port)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"cannot start: could not listen on 127.0.0.1:{port}" in second.stderr, second.stderr[-3000:]
        assert "serving on" not in second.stderr
        assert health_status(first.address) == SERVING
    finally:
        assert first.stop() == 0, first.log


def test_a_second_multi_worker_gateway_on_a_taken_port_fails_to_start(tmp_path: Path) -> None:
    """Both use SO_REUSEPORT for their own workers; the second must still not join the first."""
    port = free_port()
    first = start_server_process(tmp_path, listen=f"127.0.0.1:{port}", extra_args=["--workers", "2"])
    try:
        second = run_second_server(tmp_path, port, "--workers", "2")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"could not listen on 127.0.0.1:{port}" in second.stderr, second.stderr[-3000:]
        assert "is another server using it?" in second.stderr
        assert "worker-0 started" not in second.stderr  # refused before spawning anything
        assert health_status(first.address) == SERVING
    finally:
        assert first.stop() == 0, first.log


def _wait_for_workers(
    pid: int, count: int, exclude: frozenset[int] = frozenset(), timeout: float = 30
) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        workers = [w for w in children(pid) if alive(w) and w not in exclude]
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"{count} workers of {pid} did not appear (have {children(pid)})")


def _wait_serving(address: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if health_status(address) == SERVING:
                return
        except Exception:  # noqa: BLE001, S110 - not listening yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"{address} never served")


async def test_a_killed_worker_is_restarted_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    server = await asyncio.to_thread(
        start_server_process, tmp_path, listen=f"127.0.0.1:{port}", extra_args=["--workers", "2"]
    )
    try:
        workers = await asyncio.to_thread(_wait_for_workers, server.pid, 2)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)  # the OOM killer, say
        # A new worker replaces it: two live workers again, the victim not among them.
        replaced = await asyncio.to_thread(_wait_for_workers, server.pid, 2, frozenset({victim}))
        assert victim not in replaced and len(replaced) == 2
        assert re.search(
            rf"worker-\d \(pid {victim}\) died of signal 9; restarting it in 0\.5 s", server.log
        ), server.log[-3000:]
        # Both workers answer: ask often enough that the kernel gives the new one connections too.
        for _ in range(20):
            await asyncio.to_thread(_wait_serving, server.address)
        assert server.process.poll() is None
        code = await asyncio.to_thread(server.stop)
    finally:
        server.close()
    # Recovered: the SIGTERM was a normal stop.
    assert code == 0, server.log[-3000:]


async def test_a_worker_that_keeps_crashing_makes_the_parent_exit_non_zero(tmp_path: Path) -> None:
    port = free_port()
    server = await asyncio.to_thread(
        start_server_process, tmp_path, listen=f"127.0.0.1:{port}", extra_args=["--workers", "2"]
    )
    try:
        killed: set[int] = set()
        # Kill whichever worker is "worker-0" each time it comes back, MAX_CRASHES times.
        for _ in range(MAX_CRASHES):
            pid = await asyncio.to_thread(_wait_worker_pid, server, 0, killed)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        code = await asyncio.to_thread(server.wait, 60)
    finally:
        server.close()
    assert code == EXIT_CRASH_LOOP, server.log[-3000:]
    assert f"{MAX_CRASHES} exits within 60 s, it keeps crashing; stopping" in server.log
    assert "restarting it in 4 s" in server.log  # the backoff doubled: 0.5, 1, 2, 4
    # The other worker was stopped, gracefully (it logs its stop), not left behind.
    assert server.log.count("llmgateway: stopped") >= 1, server.log[-3000:]


def _wait_worker_pid(server: ServerProcess, index: int, exclude: set[int], timeout: float = 60) -> int:
    """The pid of live `worker-<index>`, from the parent's log (`worker-0 started (pid N)`)."""
    end = time.monotonic() + timeout
    pattern = re.compile(rf"worker-{index} started \(pid (\d+)\)")
    while time.monotonic() < end:
        pids = [int(p) for p in pattern.findall(server.log)]
        fresh = [p for p in pids if p not in exclude and alive(p)]
        if fresh:
            return fresh[-1]
        time.sleep(0.05)
    raise AssertionError(f"worker-{index} did not (re)start:\n{server.log[-3000:]}")
