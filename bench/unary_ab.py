"""Unary CPU per request: the gateway and the bare aiohttp forwarder, alternately, on one machine.

The full bench measures each server once, minutes apart; on a shared machine whose speed moves
by more than the difference, alternating short rounds is the fairer ratio. Each round starts a
fresh 1-worker gateway (as `make bench` does: pinned to CPU 0, h2load and the upstream on the
others), drives `--requests` Create calls twice, stops it, then does the same with
`bench/floor.py --upstream URL --client aiohttp`, and prints both and their ratio.

`--growth N`: instead, N rounds on one gateway (CPU per request as it serves more calls and its
trace file grows).

Run: `PYTHONPATH=.:generated python -m bench.unary_ab [--requests 5000] [--rounds 2] [--growth 6]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import load, procs, runner, workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--growth", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unary-ab-"))
    cpus = procs.CPUS
    server_cpus, client_cpus = ([cpus[0]], cpus[1:]) if len(cpus) >= 2 else (None, None)
    upstream, port = runner.start_upstream(work, client_cpus)
    root = f"http://127.0.0.1:{port}"
    body = workload.grpc_request_bytes(f"{root}/v1")

    def measure(service: procs.Service, target: str) -> float:
        result = load.run_h2load(
            target=target,
            method="Create",
            body=body,
            requests=args.requests,
            concurrency=32,
            cpus=client_cpus,
            watch={"server": service.pid},
            workdir=work,
        )
        return result.cpu_per_request_us("server")

    try:
        if args.growth:
            gateway, gw_port = runner.start_gateway(work, root, 1, server_cpus, "growth")
            try:
                db = work / "traces-growth.db"
                for i in range(args.growth):
                    us = measure(gateway, f"127.0.0.1:{gw_port}")
                    print(f"round {i}: {us:.0f} us per request, trace file {db.stat().st_size / 1e6:.0f} MB")
            finally:
                gateway.stop()
            return
        for i in range(args.rounds):
            gateway, gw_port = runner.start_gateway(work, root, 1, server_cpus, f"w{i}")
            ours = [measure(gateway, f"127.0.0.1:{gw_port}") for _ in range(2)]
            gateway.stop()
            forwarder, target = runner.start_floor(
                work, f"forwarder-{i}", ["--upstream", f"{root}/v1", "--client", "aiohttp"], server_cpus
            )
            theirs = [measure(forwarder, target) for _ in range(2)]
            forwarder.stop()
            print(
                f"round {i}: gateway {ours[0]:.0f} / {ours[1]:.0f} us, aiohttp forwarder "
                f"{theirs[0]:.0f} / {theirs[1]:.0f} us: {sum(ours) / sum(theirs):.2f}x",
                flush=True,
            )
            time.sleep(0.5)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
