"""`llm-gateway serve|keys`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence

from server.config import Settings, add_arguments, load_settings
from server.grpc_runtime import apply_grpc_defaults


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_one(settings: Settings) -> int:
    from server.app import serve

    try:
        import uvloop

        return int(uvloop.run(serve(settings)))
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep asyncio as the fallback
        return asyncio.run(serve(settings))


def _worker(settings: Settings) -> None:
    _configure_logging(settings.log_level)
    sys.exit(_run_one(settings))


def _serve(settings: Settings) -> int:
    if settings.workers == 1:
        return _run_one(settings)
    if settings.listen.rsplit(":", 1)[-1] == "0":
        raise SystemExit("LLMGW_WORKERS > 1 needs a fixed port: the workers share it with SO_REUSEPORT")
    # Each worker is a process with its own event loop bound to the same port (SO_REUSEPORT);
    # the kernel spreads connections over them.
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings,), name=f"worker-{i}") for i in range(settings.workers)
    ]
    for process in workers:
        process.start()

    def forward(signum: int, _frame: object) -> None:
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for process in workers:
        process.join()
        codes.append(process.exitcode or 0)
    return max(codes)


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
