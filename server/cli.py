"""`llm-gateway serve|keys`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Sequence

from server.config import Settings, add_arguments, load_settings
from server.grpc_runtime import apply_grpc_defaults
from server.metrics_dir import WORKER_ENV, forget_process, multiprocess_metrics

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_one(settings: Settings) -> int:
    # Until serve() installs its handlers: importing the server takes a while, and a SIGTERM then
    # must stop it cleanly (not kill it; PID 1 in a container would even ignore it).
    signalled: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        signalled.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in _STOP_SIGNALS}
    try:
        from server.app import serve

        try:
            import uvloop

            return int(uvloop.run(serve(settings, signalled=signalled)))
        except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio is the fallback
            return asyncio.run(serve(settings, signalled=signalled))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker(settings: Settings, index: int) -> None:
    os.environ[WORKER_ENV] = str(index)  # worker 0 serves the admin listener
    _configure_logging(settings.log_level)
    sys.exit(_run_one(settings))


def _serve(settings: Settings) -> int:
    if settings.workers == 1:
        return _run_one(settings)
    if settings.listen.rsplit(":", 1)[-1] == "0":
        raise SystemExit("LLMGW_WORKERS > 1 needs a fixed port: the workers share it with SO_REUSEPORT")
    # Each worker is a process with its own event loop bound to the same port (SO_REUSEPORT);
    # the kernel spreads connections over them.
    with multiprocess_metrics() as metrics_path:  # one scrape of worker 0 sums every worker's metrics
        return _serve_workers(settings, metrics_path)


def _serve_workers(settings: Settings, metrics_path: str) -> int:
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings, i), name=f"worker-{i}")
        for i in range(settings.workers)
    ]
    # The handler is in place before the first worker starts: a signal while they start is
    # forwarded to each (a worker still importing takes it as a stop, see `_run_one`).
    forwarded: list[int] = []
    started: list[multiprocessing.process.BaseProcess] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        for process in started:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it exited in between
                    os.kill(process.pid, signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, forward)
    for process in workers:
        process.start()
        started.append(process)
        if forwarded and process.pid is not None:
            os.kill(process.pid, forwarded[-1])  # the signal came while it was being spawned
    # Waited for as each exits (not in order): a worker that died has its live gauges dropped
    # at once, while the others keep serving.
    running = {process.sentinel: process for process in workers}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            assert isinstance(sentinel, int)  # process sentinels are file descriptors
            process = running.pop(sentinel)
            process.join()
            if process.pid is not None:
                forget_process(metrics_path, process.pid)
    return max(_exit_code(process.exitcode, forwarded) for process in workers)


def _exit_code(code: int | None, forwarded: Sequence[int]) -> int:
    """A worker's exit code for the parent's own: killed by a signal is 128 + N (as a shell says),
    not 0; except the stop signal we forwarded, which a worker still spawning dies of."""
    if code is None or code >= 0:
        return code or 0
    if -code in forwarded:
        return 0
    return 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    # First, before anything below imports grpc (the keys sub-commands do, via server.errors):
    # grpc reads these variables once, when it loads. Spawned workers inherit them.
    apply_grpc_defaults()
    parser = argparse.ArgumentParser(
        prog="llm-gateway", description="A gRPC gateway between agents and LLM providers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    from server.auth.cli import add_keys_subparser

    keys = add_keys_subparser(commands, lambda action: add_arguments(action, nested=True))
    add_arguments(keys)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    _configure_logging(settings.log_level)
    if args.command == "serve":
        try:
            return _serve(settings)
        except (OSError, ValueError) as exc:
            logging.getLogger("llmgateway").error("cannot start: %s", exc)
            return 2
    from server.auth.cli import run_keys_command

    return run_keys_command(args, settings)
