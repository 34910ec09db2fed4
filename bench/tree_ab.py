"""Two source trees of the gateway, alternately, on one machine: CPU per request of each row.

A full `make bench` measures each row once; on a shared machine whose speed moves by more than
some budgets' margins, a row that reads over can be measured again here, the two trees
alternating (a fresh gateway of each per round, started from its own tree), so that a change
is told from the minute it ran in. Rows: unary and stream CPU per request on the OpenAI and
Anthropic paths (1 worker pinned to CPU 0, h2load and the upstream on the others), and with
`--workers`, the 1- and 2-worker CPU per request and throughput (2 workers unpinned).

Run: `PYTHONPATH=.:generated python -m bench.tree_ab --trees /path/a /path/b [--rounds 2]
[--requests 8000] [--workers]`. Each tree needs its `generated/` code.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import load, procs, runner, workload


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tree_ab")
    parser.add_argument("--trees", nargs=2, required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--workers", action="store_true", help="the 1 -> 2 workers rows instead")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tree-ab-"))
    cpus = procs.CPUS
    server_cpus, client_cpus = ([cpus[0]], cpus[1:]) if len(cpus) >= 2 else (None, None)
    upstream, port = runner.start_upstream(work, client_cpus)
    root = f"http://127.0.0.1:{port}"
    openai = workload.grpc_request_bytes(f"{root}/v1")
    anthropic = workload.grpc_request_bytes(f"{root}/anthropic/v1", "anthropic", workload.ANTHROPIC_MODEL)

    def measure(
        service: procs.Service, port: int, body: bytes, method: str, requests: int, pinned: bool = True
    ) -> load.LoadResult:
        return load.run_h2load(
            target=f"127.0.0.1:{port}",
            method=method,
            body=body,
            requests=requests,
            concurrency=32,
            cpus=client_cpus if pinned else None,
            watch={"server": service.pid},
            workdir=work,
        )

    cwd = os.getcwd()
    try:
        for i in range(args.rounds):
            for tree in args.trees:
                tree = tree.resolve()
                # `python -m server` takes the tree from its working directory and PYTHONPATH.
                os.environ["PYTHONPATH"] = f"{tree}:{tree}/generated"
                os.chdir(tree)
                tag = f"{tree.name}-{i}"
                if args.workers:
                    rows = []
                    for workers, pin in ((1, server_cpus), (2, None)):
                        gw, gw_port = runner.start_gateway(work, root, workers, pin, f"{tag}-w{workers}")
                        measure(gw, gw_port, openai, "Create", args.requests // 4, pin is not None)
                        r = measure(gw, gw_port, openai, "Create", args.requests, pin is not None)
                        rows.append((r.cpu_per_request_us("server"), r.throughput))
                        gw.stop()
                    (one_us, one_rps), (two_us, two_rps) = rows
                    print(
                        f"round {i} {tree}: 1 worker {one_us:.0f} us, {one_rps:,.0f}/s; 2 workers "
                        f"{two_us:.0f} us, {two_rps:,.0f}/s; projected {2 * one_us / two_us:.2f}x, "
                        f"measured {two_rps / one_rps:.2f}x",
                        flush=True,
                    )
                    continue
                gw, gw_port = runner.start_gateway(work, root, 1, server_cpus, tag)
                measure(gw, gw_port, openai, "Create", args.requests // 4)  # warm-up
                us = {
                    name: measure(gw, gw_port, body, method, n).cpu_per_request_us("server")
                    for name, body, method, n in (
                        ("unary", openai, "Create", args.requests),
                        ("unary anthropic", anthropic, "Create", args.requests),
                        ("stream", openai, "StreamCreate", args.requests // 3),
                        ("stream anthropic", anthropic, "StreamCreate", args.requests // 3),
                    )
                }
                gw.stop()
                print(
                    f"round {i} {tree}: unary {us['unary']:.0f} us, Anthropic {us['unary anthropic']:.0f} "
                    f"({us['unary anthropic'] / us['unary']:.2f}x); stream {us['stream']:.0f} us, "
                    f"Anthropic {us['stream anthropic']:.0f} ({us['stream anthropic'] / us['stream']:.2f}x)",
                    flush=True,
                )
    finally:
        os.chdir(cwd)
        upstream.stop()


if __name__ == "__main__":
    main()
