"""`llm-gateway serve|keys`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
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
    # SIGHUP reloads the routes once serving; until then it must not kill the process (the
    # routes file is read during start-up anyway).
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
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


def _stop_with_parent(sentinel: int) -> None:
    """Waits for the parent's end, then stops this worker gracefully (its own SIGTERM)."""
    multiprocessing.connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(settings: Settings, index: int) -> None:
    # Spawned with SIGHUP ignored and blocked (server.supervisor): ignored it stays until serving.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    # A parent killed with SIGKILL cannot stop its workers: orphans would keep the port and
    # serve unsupervised. Its end closes the spawn pipe, which this thread waits on.
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(
            target=_stop_with_parent, args=(parent.sentinel,), name="parent-watch", daemon=True
        ).start()
    os.environ[WORKER_ENV] = str(index)  # worker 0 serves the admin listener
    _configure_logging(settings.log_level)
    sys.exit(_run_one(settings))


def _serve(settings: Settings) -> int:
    if settings.workers == 1:
        return _run_one(settings)
    if settings.listen.rsplit(":", 1)[-1] == "0":
        raise SystemExit("LLMGW_WORKERS > 1 needs a fixed port: the workers share it with SO_REUSEPORT")
    from server.supervisor import Supervisor, check_port_free

    check_port_free(settings.listen)
    with multiprocess_metrics() as metrics_path:  # one scrape of worker 0 sums every worker's metrics
        # A worker that died has its live gauges (in-flight calls) dropped at once.
        def drop_gauges(pid: int) -> None:
            forget_process(metrics_path, pid)

        return Supervisor(settings.workers, _worker, (settings,), on_exit=drop_gauges).run()


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
