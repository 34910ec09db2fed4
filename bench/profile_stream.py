"""CPU per paced stream and per relayed chunk, in-process: the gateway's stream path vs the floor's.

Both run in this process against `bench/upstream.py` (a subprocess on loopback) at its
`/paced/<chunks>/<gap_us>/` path, many streams at once, without grpc's C core or any client:

- gateway: the real `GatewayServer` started as the tests start it (`allowed_endpoints` the
  upstream, `admin_listen=""`), and its StreamCreate behaviour called exactly as grpc calls it
  (the handler after `InFlight.track`, i.e. InFlight running the servicer's parts around
  Gateway.stream_wire), each message put through the handler's `response_serializer`;
- floor: `bench.floor._relay` with the gateway's HTTP client (what `bench/floor.py --relay URL
  --client gateway` runs), inside a generator like the floor's `stream_create`.

Rounds alternate gateway and floor (the machine is shared), with two chunk counts each; main-thread
CPU (`time.thread_time`) per stream is fitted as a + b * chunks: a is the fixed cost of a stream,
b the cost per chunk. `PROF=tottime` (or `cumulative`) profiles one extra gateway run instead.

Instruction counts, repeatable where CPU time is not: `CALLGRIND=1 valgrind --tool=callgrind
--instr-atstart=no --separate-threads=yes python -m bench.profile_stream --rounds 2
--concurrency 2 --streams 4 --gap-us 40000` counts each measurement alone (zeroed, switched on
and dumped by `callgrind_control`) and fits the main thread's instructions per stream the same
way. The gap is wide and two streams run at a time: slow as valgrind makes it, every chunk is
still a read of its own. `--only` as above.

Run: `PYTHONPATH=.:generated python -m bench.profile_stream [--streams 400] [--concurrency 16]
[--gap-us 2000] [--chunks 10,200] [--rounds 3] [--only gateway|floor]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

STREAM_METHOD = "/llmgateway.v1.ChatCompletionService/StreamCreate"


class _Context:
    """What the servicer asks of grpc's context on a successful stream."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def code(self) -> None:
        return None

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code} {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def _start_upstream(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = workdir / "upstream.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--port", "0", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the upstream did not start")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{int(ready.read_text())}"


async def _gateway(workdir: Path, upstream_root: str) -> tuple[Callable[[str], AsyncIterator[bytes]], Any]:
    """A started GatewayServer and a function running one stream through its StreamCreate handler."""
    from bench.workload import grpc_request_bytes
    from server.api import chat
    from server.app import GatewayServer
    from server.config import Settings

    captured: list[Any] = []
    original = chat.ChatCompletionServicer.handlers

    def capture(self: Any) -> Any:
        service = original(self)
        captured.append(service)
        return service

    chat.ChatCompletionServicer.handlers = capture  # type: ignore[method-assign]
    try:
        settings = Settings(
            listen="127.0.0.1:0",
            sqlite_path=str(workdir / "gateway.db"),
            allowed_endpoints=(upstream_root,),
            admin_listen="",
        )
        server = GatewayServer(settings)
        await server.start()
    finally:
        chat.ChatCompletionServicer.handlers = original  # type: ignore[method-assign]
    handler = captured[0]._handlers[STREAM_METHOD]  # after track(): as grpc calls it
    behaviour, serialize = handler.unary_stream, handler.response_serializer
    requests: dict[str, bytes] = {}

    async def one(base: str) -> AsyncIterator[bytes]:
        data = requests.get(base)
        if data is None:
            data = requests[base] = grpc_request_bytes(base)
        async for message in behaviour(data, _Context()):
            yield serialize(message)

    return one, server


def _floor(upstream_root: str) -> Callable[[str], AsyncIterator[bytes]]:
    from bench.floor import _messages, _relay

    final = _messages(2)[1][-1]
    relays: dict[str, Callable[[], AsyncIterator[bytes]]] = {}

    async def one(base: str) -> AsyncIterator[bytes]:
        relay = relays.get(base)
        if relay is None:
            relay = relays[base] = _relay(base, final, "gateway")
        async for message in relay():  # the floor's stream_create
            yield message

    return one


async def _run(one: Callable[[str], AsyncIterator[bytes]], base: str, streams: int, concurrency: int) -> int:
    """`streams` streams, `concurrency` at a time; the messages they relayed."""
    left = streams
    messages = 0

    async def worker() -> None:
        nonlocal left, messages
        while left > 0:
            left -= 1
            async for _ in one(base):
                messages += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return messages


def _counted(measure: bool) -> int | None:
    """Under callgrind (CALLGRIND=1): count from here (`measure`), or dump and return the count."""
    if not os.environ.get("CALLGRIND"):
        return None
    pid = str(os.getpid())
    for command in (["-z"], ["-i", "on"]) if measure else (["-i", "off"], ["-d"]):
        subprocess.run(["callgrind_control", *command, pid], check=True, stdout=subprocess.DEVNULL)
    if measure:
        return None
    # With --separate-threads=yes: the main thread's dump alone (grpc's pollers and the trace
    # writer run on other threads, by the clock: their counts follow valgrind's speed).
    dumps = sorted(
        Path.cwd().glob(f"callgrind.out.{pid}.*-01"), key=lambda p: int(p.name.split(".")[-1][:-3])
    )
    if not dumps:
        dumps = sorted(Path.cwd().glob(f"callgrind.out.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("totals:"):  # the sum of the dump's costs ("summary:" can wrap)
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def _fit(points: dict[int, float]) -> tuple[float, float]:
    (n1, c1), (n2, c2) = sorted(points.items())
    per_chunk = (c2 - c1) / (n2 - n1)
    return c1 - per_chunk * n1, per_chunk


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="profile-stream-"))
    proc, root = _start_upstream(workdir)
    server = None
    try:
        targets: dict[str, Callable[[str], AsyncIterator[bytes]]] = {}
        if args.only in (None, "gateway"):
            targets["gateway"], server = await _gateway(workdir, root)
        if args.only in (None, "floor"):
            targets["floor"] = _floor(root)
        chunk_counts = [int(c) for c in args.chunks.split(",")]
        bases = {n: f"{root}/paced/{n}/{args.gap_us}/v1" for n in chunk_counts}
        for one in targets.values():  # warm-up: connections, caches
            await _run(one, bases[chunk_counts[0]], args.concurrency * 2, args.concurrency)
        if os.environ.get("PROF"):
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.enable()
            await _run(
                targets["gateway" if "gateway" in targets else "floor"],
                bases[max(chunk_counts)],
                args.streams,
                args.concurrency,
            )
            profile.disable()
            pstats.Stats(profile).sort_stats(os.environ["PROF"]).print_stats(40)
            return 0
        results: dict[str, dict[int, list[float]]] = {n: {c: [] for c in chunk_counts} for n in targets}
        instructions: dict[str, dict[int, list[float]]] = {n: {c: [] for c in chunk_counts} for n in targets}
        for round_ in range(args.rounds):
            for name, one in targets.items():
                for chunks in chunk_counts:
                    _counted(True)
                    start = time.thread_time()
                    messages = await _run(one, bases[chunks], args.streams, args.concurrency)
                    used = time.thread_time() - start
                    counted = _counted(False)
                    results[name][chunks].append(used / args.streams * 1e6)
                    extra = f"{messages / args.streams:.1f} msgs"
                    if counted is not None:
                        instructions[name][chunks].append(counted / args.streams)
                        extra += f", {counted / args.streams:,.0f} instructions/stream"
                    print(
                        f"round {round_} {name:7} {chunks:4} chunks: "
                        f"{used / args.streams * 1e6:8.1f} us/stream ({extra})",
                        file=sys.stderr,
                    )
        print(f"{'':8} {'fixed us/stream':>16} {'us/chunk':>9}   (median of {args.rounds} rounds)")
        fits = {}
        for name, by_chunks in results.items():
            fixed, per_chunk = _fit({c: statistics.median(v) for c, v in by_chunks.items()})
            fits[name] = (fixed, per_chunk)
            print(f"{name:8} {fixed:16.1f} {per_chunk:9.2f}")
        if len(fits) == 2:
            (gf, gc), (ff, fc) = fits["gateway"], fits["floor"]
            print(f"{'ratio':8} {gf / ff:16.2f} {gc / fc:9.2f}")
        if os.environ.get("CALLGRIND"):
            print(f"{'':8} {'fixed instr/stream':>18} {'instr/chunk':>11}   (callgrind, median of rounds)")
            for name, by_chunks in instructions.items():
                fixed, per_chunk = _fit({c: statistics.median(v) for c, v in by_chunks.items()})
                print(f"{name:8} {fixed:18,.0f} {per_chunk:11,.0f}")
    finally:
        if server is not None:
            await server.stop(grace=1.0)
        proc.terminate()
        proc.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_stream")
    parser.add_argument("--streams", type=int, default=400, help="streams per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--gap-us", type=int, default=2000, help="the upstream's gap between chunks")
    parser.add_argument("--chunks", default="10,200", help="the two chunk counts of the fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("gateway", "floor"))
    args = parser.parse_args(argv)
    from server.grpc_runtime import apply_grpc_defaults

    apply_grpc_defaults()
    import uvloop

    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
