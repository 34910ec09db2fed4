"""The gateway's own CPU per unary call, in-process: no gRPC transport, the real call path.

Starts `bench.upstream` as a subprocess on loopback, starts the real `GatewayServer` in this
process with the bench's defaults (SQLite traces, token guard, limits, routing, cost, metrics,
the admin listener), and calls the tracked `Create` handler (what grpc.aio calls: in-flight
tracking, metrics scope, auth, decoding, the gateway, the response serializer) with the bench's
request bytes, each call in a task of its own as grpc.aio runs it, `--concurrency` at a time.

Prints the CPU per call of the event loop's thread (`time.thread_time`) and of the whole
process (the SQLite writer's thread included), after a warm-up and with the trace writer
flushed. `PROF=tottime` (or `cumulative`) profiles the measured calls with cProfile instead
(the figures then include the profiler's overhead).

    PYTHONPATH=.:generated python -m bench.profile_call --calls 20000
    PROF=tottime PYTHONPATH=.:generated python -m bench.profile_call --calls 5000 | head -60
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.grpc_runtime import apply_grpc_defaults

apply_grpc_defaults()  # before grpc loads, as `llm-gateway` does

from bench import procs, workload  # noqa: E402
from bench.runner import start_upstream  # noqa: E402

CREATE = "/llmgateway.v1.ChatCompletionService/Create"


class FakeContext:
    """What the servicer path asks of a grpc.aio ServicerContext on a successful call."""

    __slots__ = ("_code",)

    def __init__(self) -> None:
        self._code: Any = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> Any:
        return self._code

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        self._code = code
        raise RuntimeError(f"call aborted: {code} {details}")


def callgrind(on: bool) -> None:
    """Under `valgrind --tool=callgrind --instr-atstart=no` (CALLGRIND=1): count the measured calls only."""
    if os.environ.get("CALLGRIND"):
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True)


async def run(args: argparse.Namespace, upstream_base: str, db: Path) -> dict[str, float]:
    from server.api.chat import ChatCompletionServicer
    from server.app import GatewayServer
    from server.config import Settings
    from server.gc_tuning import tune_for_serving

    captured: list[Any] = []
    handlers = ChatCompletionServicer.handlers

    def capture(self: ChatCompletionServicer) -> Any:
        service = handlers(self)
        captured.append(service)
        return service

    ChatCompletionServicer.handlers = capture  # type: ignore[method-assign]
    settings = Settings(
        listen="127.0.0.1:0",
        sqlite_path=str(db),
        allowed_endpoints=(upstream_base,),
        admin_listen=f"127.0.0.1:{procs.free_port()}",
    )
    server = GatewayServer(settings)
    await server.start()
    try:
        tune_for_serving()
        service = captured[0]
        create = service._handlers[CREATE]  # tracked by InFlight, as served
        behaviour, serialize = create.unary_unary, create.response_serializer
        data = workload.grpc_request_bytes(upstream_base)
        writer = server._running.writer  # type: ignore[union-attr]

        async def one() -> None:
            response = await behaviour(data, FakeContext())
            serialize(response)

        if args.bare:  # the in-process floor: only the upstream call, as bench.floor's forwarder
            from bench.floor import _forward

            forward = _forward(upstream_base, args.bare)

            async def one() -> None:
                await forward()

        async def worker(n: int) -> None:
            for _ in range(n):
                await asyncio.create_task(one())  # grpc.aio runs each call in a task

        async def batch(total: int) -> None:
            per, extra = divmod(total, args.concurrency)
            await asyncio.gather(*(worker(per + (i < extra)) for i in range(args.concurrency)))
            await writer.flush(timeout=60)

        await batch(args.warmup)
        callgrind(True)
        profile = cProfile.Profile() if args.prof else None
        wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        if profile is not None:
            profile.enable()
        await batch(args.calls)
        if profile is not None:
            profile.disable()
        callgrind(False)
        wall, thread, process = (
            time.perf_counter() - wall,
            time.thread_time() - thread,
            time.process_time() - process,
        )
        if profile is not None:
            pstats.Stats(profile, stream=sys.stdout).sort_stats(args.prof).print_stats(args.top)
        return {
            "loop_us": thread / args.calls * 1e6,
            "process_us": process / args.calls * 1e6,
            "calls_per_s": args.calls / wall,
        }
    finally:
        await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times, one line each")
    parser.add_argument(
        "--bare",
        choices=("gateway", "aiohttp"),
        default="",
        help="call only the upstream with this HTTP client (bench.floor's forwarder), not the gateway",
    )
    parser.add_argument("--top", type=int, default=50, help="cProfile rows printed")
    args = parser.parse_args(argv)
    args.prof = os.environ.get("PROF", "")
    with tempfile.TemporaryDirectory(prefix="profile-call-") as tmp:
        workdir = Path(tmp)
        upstream, port = start_upstream(workdir, None)
        try:
            import uvloop

            base = f"http://127.0.0.1:{port}/v1"
            for i in range(args.rounds):
                # A fresh server (and trace database) per round, in this process: as one serve.
                result = uvloop.run(run(args, base, workdir / f"traces-{i}.db"))
                print(
                    f"{args.bare or 'gateway'}: {args.calls} calls, c={args.concurrency}: "
                    f"event loop {result['loop_us']:.1f} us/call, "
                    f"process {result['process_us']:.1f} us/call, {result['calls_per_s']:.0f} calls/s",
                    flush=True,
                )
        finally:
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
