"""Review of issue 15's worker supervisor with real `--workers 2` processes.

- SIGHUP (routes reload, forwarded to every live worker) must never kill a worker: one that was
  just spawned (initial start or restart after a crash) has not installed its handler yet, and
  SIGHUP's default action is to terminate. A reload during a restart backoff kills nothing, and
  the restarted worker 0 serves the admin listener again.
- A worker that exits 0 by itself (its own SIGTERM) is restarted like any other exit.
- SIGTERM to the parent during a restart backoff stops everything at once, exit 0, nothing respawned.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_hardening_shutdown_review import alive, free_port
from tests.integration.test_ops_processes import _wait_serving, _wait_worker_pid
from tests.process_harness import REPO_ROOT, ServerProcess, clean_env, start_server_process

# Several worker start-ups per test, on 2 cores shared by many test runs.
pytestmark = pytest.mark.timeout(600)


def _admin_status(port: int) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as answer:  # noqa: S310 - loopback
            return int(answer.status)
    except OSError as exc:
        return repr(exc)


def _wait_admin(port: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _admin_status(port) == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"the admin listener on {port} never answered: {_admin_status(port)}")


def _start(tmp_path: Path, admin_port: int) -> ServerProcess:
    return start_server_process(
        tmp_path,
        listen=f"127.0.0.1:{free_port()}",
        extra_args=["--workers", "2"],
        env={"LLMGW_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
        startup_timeout=120,  # 2 cores shared by many test runs
    )


def test_sighup_while_a_worker_restarts_kills_nothing(tmp_path: Path) -> None:
    admin_port = free_port()
    server = _start(tmp_path, admin_port)
    try:
        _wait_admin(admin_port)
        first = _wait_worker_pid(server, 0, set(), 120)
        other = _wait_worker_pid(server, 1, set(), 120)
        os.kill(first, signal.SIGKILL)
        # Reloads every 30 ms across the backoff, the respawn and the new worker's start-up.
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            server.send_signal(signal.SIGHUP)
            time.sleep(0.03)
        assert "died of signal 1" not in server.log, server.log[-4000:]
        restarted = _wait_worker_pid(server, 0, {first}, 120)
        # One restart (the SIGKILL), the replacement alive, worker 1 untouched.
        assert len(re.findall(r"worker-0 started", server.log)) == 2, server.log[-4000:]
        if not (alive(restarted) and alive(other)):
            end = time.monotonic() + 5  # the parent's line about the worker that died, if it did
            while f"(pid {other}) " not in server.log and time.monotonic() < end:
                time.sleep(0.05)
            raise AssertionError(
                f"restarted {restarted} alive: {alive(restarted)}, other {other} alive: "
                f"{alive(other)}\n{server.log[-8000:]}"
            )
        _wait_admin(admin_port)  # the new worker 0 serves the admin listener again
        _wait_serving(server.address, timeout=120)
        assert server.process.poll() is None
        code = server.stop(timeout=90)
    finally:
        server.close()
    assert code == 0, server.log[-4000:]


def test_sighup_right_after_start_kills_no_worker(tmp_path: Path) -> None:
    """`systemctl reload` just after `start`: the workers are still importing."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "server", "serve", "--listen", f"127.0.0.1:{port}"),
            *("--workers", "2", "--sqlite-path", str(tmp_path / "gw.db")),
        ],
        cwd=REPO_ROOT,
        env=clean_env({"LLMGW_ADMIN_LISTEN": ""}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ServerProcess(process, port=port)
    server._reader = threading.Thread(target=server._drain, daemon=True)
    server._reader.start()
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            if "worker-1 started" in server.log:  # the parent's handler is in place
                server.send_signal(signal.SIGHUP)
            time.sleep(0.03)
        _wait_serving(server.address, timeout=120)
        assert "died of signal 1" not in server.log, server.log[-4000:]
        assert len(re.findall(r"worker-\d started", server.log)) == 2, server.log[-4000:]
        code = server.stop(timeout=90)
    finally:
        server.close()
    assert code == 0, server.log[-4000:]


def test_a_worker_that_exits_0_by_itself_is_restarted(tmp_path: Path) -> None:
    server = _start(tmp_path, free_port())
    try:
        victim = _wait_worker_pid(server, 1, set(), 120)
        os.kill(victim, signal.SIGTERM)  # the worker stops gracefully and exits 0; the parent was not told
        replacement = _wait_worker_pid(server, 1, {victim}, 120)
        assert f"worker-1 (pid {victim}) exited with code 0; restarting it in 0.5 s" in server.log
        assert alive(replacement)
        _wait_serving(server.address, timeout=120)
        code = server.stop(timeout=90)
    finally:
        server.close()
    assert code == 0, server.log[-4000:]


def test_sigterm_during_a_restart_backoff_stops_at_once(tmp_path: Path) -> None:
    server = _start(tmp_path, free_port())
    try:
        victim = _wait_worker_pid(server, 0, set(), 120)
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 20
        while "restarting it in 0.5 s" not in server.log and time.monotonic() < end:
            time.sleep(0.01)
        before = len(server.log)
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)  # worker 1's graceful stop, on a loaded machine
    finally:
        server.close()
    assert code == 0, server.log[-4000:]
    assert "worker-0 started" not in server.log[before:], server.log[-4000:]  # nothing respawned


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    """The parent SIGKILLed (OOM killer, `kill -9`): its workers must not live on as orphans
    holding the port (a restarted gateway would then refuse to start, "is another server
    using it?", while nobody supervises the orphans)."""
    port = free_port()
    server = start_server_process(
        tmp_path, listen=f"127.0.0.1:{port}", extra_args=["--workers", "2"], startup_timeout=120
    )
    try:
        workers = [_wait_worker_pid(server, i, set(), 120) for i in (0, 1)]
        server.process.kill()
        server.process.wait(10)
        end = time.monotonic() + 60
        while any(alive(w) for w in workers) and time.monotonic() < end:
            time.sleep(0.1)
        left = [w for w in workers if alive(w)]
    finally:
        for worker in workers:  # do not leave them behind when the test fails
            if alive(worker):
                os.kill(worker, signal.SIGKILL)
        server.close()
    assert left == [], f"orphaned workers still running: {left}\n{server.log[-3000:]}"
    assert "shutting down" in server.log  # they stopped gracefully, not killed
