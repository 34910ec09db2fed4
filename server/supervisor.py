"""`--workers N`: the parent process that runs N workers on one port and restarts those that die.

Each worker is a spawned process with its own event loop, bound to the same port with
SO_REUSEPORT; the kernel spreads connections over them. The parent serves nothing itself.

- A worker that exits while the parent was not told to stop (OOM-killed, a crash, any exit) is
  restarted after a backoff: `RESTART_BASE_DELAY` doubled for each earlier exit of that worker
  within `CRASH_WINDOW`, at most `RESTART_MAX_DELAY`. Every exit and restart is logged.
- "Keeps crashing": one worker exited `MAX_CRASHES` times within `CRASH_WINDOW` seconds. The
  parent then stops the other workers (SIGTERM, graceful) and exits 1: a worker that cannot
  stay up (a bad database path, a port another program holds) is reported, not retried forever.
- SIGTERM/SIGINT: forwarded to every worker, no more restarts; the parent exits with the highest
  worker exit code (a worker killed by a signal counts as 128 + the signal, except the stop
  signal itself, which a worker still spawning dies of).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("llmgateway.supervisor")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_BASE_DELAY = 0.5
RESTART_MAX_DELAY = 10.0
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
# Exit code of the parent when a worker keeps crashing.
EXIT_CRASH_LOOP = 1


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    exits: list[float] = field(default_factory=list)  # monotonic times of its recent exits
    restart_at: float | None = None  # when a dead worker is started again


def check_port_free(listen: str) -> None:
    """OSError naming the address if something already listens on it.

    The workers bind with SO_REUSEPORT, which would let them share the port with another
    gateway (of the same user) that also uses it: two servers with different databases would
    then split the traffic silently. A plain bind here fails on a port anyone holds.
    """
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or host.startswith("unix"):
        return  # not a TCP address (a Unix socket): SO_REUSEPORT does not apply
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every address, as grpc reads it
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As grpc's listeners: connections of an earlier server left in TIME_WAIT do not count,
        # a socket listening on the port does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise OSError(
                f"could not listen on {listen}: {exc.strerror or exc} (is another server using it?)"
            ) from exc


def exit_code(code: int | None, stop_signals: Sequence[int]) -> int:
    """A worker's exit code for the parent's own: killed by a signal is 128 + N (as a shell says),
    not 0; except the stop signal we forwarded, which a worker still spawning dies of."""
    if code is None or code >= 0:
        return code or 0
    if -code in stop_signals:
        return 0
    return 128 - code


class Supervisor:
    """Runs `count` workers (`target(*args, index)` in spawned processes) until told to stop.

    SIGHUP is passed on to every live worker (each reloads its routes file itself)."""

    def __init__(
        self,
        count: int,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._on_exit = on_exit  # called with the pid of every worker that exited
        self._target = target
        self._args = args
        self._slots = [_Slot(i) for i in range(count)]
        self._stop_signals: list[int] = []
        # The signal handler writes here, so the wait below wakes at once (PEP 475 would
        # otherwise resume it after the handler ran).
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def _live(self) -> list[BaseProcess]:
        return [s.process for s in self._slots if s.process is not None and s.process.pid is not None]

    def _forward(self, signum: int, _frame: object) -> None:
        self._stop_signals.append(signum)
        for process in self._live():
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it exited in between
                    os.kill(process.pid or 0, signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def _forward_reload(self, signum: int, _frame: object) -> None:
        for process in self._live():
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid or 0, signum)

    def _start(self, slot: _Slot) -> None:
        process = self._context.Process(
            target=self._target, args=(*self._args, slot.index), name=f"worker-{slot.index}"
        )
        slot.process = process
        slot.restart_at = None
        # The new worker handles SIGHUP only once serving, after Python's start-up and its
        # imports, and SIGHUP's default action kills: it starts with SIGHUP ignored (kept across
        # exec). Blocked here meanwhile, so a reload that comes now reaches the parent's handler
        # right after instead of being lost (the worker unblocks it, server.cli._worker).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        reload_handler = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGHUP, reload_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        log.info("worker-%d started (pid %s)", slot.index, process.pid)
        if self._stop_signals and process.pid is not None:
            os.kill(process.pid, self._stop_signals[-1])  # the signal came while it was being spawned

    def _exited(self, slot: _Slot, now: float) -> bool:
        """Record a worker's unrequested exit; False when it keeps crashing (give up)."""
        assert slot.process is not None
        code = slot.process.exitcode
        pid = slot.process.pid
        slot.process = None
        slot.exits = [t for t in slot.exits if now - t < CRASH_WINDOW] + [now]
        how = f"died of signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if len(slot.exits) >= MAX_CRASHES:
            log.error(
                "worker-%d (pid %s) %s: %d exits within %g s, it keeps crashing; stopping",
                slot.index,
                pid,
                how,
                len(slot.exits),
                CRASH_WINDOW,
            )
            return False
        delay = min(RESTART_MAX_DELAY, RESTART_BASE_DELAY * 2 ** (len(slot.exits) - 1))
        log.error("worker-%d (pid %s) %s; restarting it in %g s", slot.index, pid, how, delay)
        slot.restart_at = now + delay
        return True

    def run(self) -> int:
        """The parent's exit code."""
        # The handler is in place before the first worker starts: a signal while they start is
        # forwarded to each (a worker still importing takes it as a stop, see server.cli).
        previous = {sig: signal.signal(sig, self._forward) for sig in STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._forward_reload)
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run(self) -> int:
        for slot in self._slots:
            self._start(slot)
        crash_loop = False
        codes: list[int] = []
        while True:
            stopping = bool(self._stop_signals) or crash_loop
            running = [s for s in self._slots if s.process is not None]
            if stopping and not running:
                break
            now = time.monotonic()
            if not stopping:
                for slot in self._slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
            pending = [s.restart_at for s in self._slots if s.restart_at is not None and not stopping]
            timeout = max(0.0, min(pending) - now) if pending else None
            sentinels = {s.process.sentinel: s for s in self._slots if s.process is not None}
            ready = multiprocessing.connection.wait([*sentinels, self._wake_read], timeout)
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
            now = time.monotonic()
            for sentinel, slot in sentinels.items():
                if sentinel not in ready:
                    continue
                assert slot.process is not None
                slot.process.join()
                if self._on_exit is not None and slot.process.pid is not None:
                    self._on_exit(slot.process.pid)
                if self._stop_signals or crash_loop:
                    codes.append(exit_code(slot.process.exitcode, self._stop_signals))
                    slot.process = None
                elif not self._exited(slot, now):
                    crash_loop = True
                    for other in self._live():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(other.pid or 0, signal.SIGTERM)
        if crash_loop:
            return EXIT_CRASH_LOOP
        return max(codes, default=0)
