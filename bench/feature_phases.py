"""Rows of the features that have their own micro-benchmark: routing, limits and cost, metrics.

Each runs as its own process (`python -m bench.<name>_bench`), as a user would run it alone, and
its table is read back into the main table's rows: the layer's CPU per request with its budget
and verdict. They measure the layer in process (the request path's added work), not through the
network, where a few microseconds would drown in the noise of a whole call.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

from bench.runner import ROOT, PhaseContext, Row

_TIMEOUT = 900.0


def _run(module: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=_TIMEOUT,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def routing_phase(ctx: PhaseContext) -> None:
    iterations = "2000" if ctx.plan.cpu_requests < 1000 else "20000"
    code, out = _run("bench.routing_bench", "--iterations", iterations)
    line = next((x for x in out.splitlines() if x.startswith("route of 3 deployments")), "")
    numbers = re.findall(r"\d+(?:\.\d+)?", line.removeprefix("route of 3 deployments"))
    if len(numbers) < 4:
        ctx.notes.append(f"routing bench failed (exit {code}): {out.strip()[-300:]}")
        return
    direct, routed, routing, budget = numbers[:4]
    ctx.rows.append(
        Row(
            metric="routing: CPU per request added by a route of 3 deployments (us)",
            gateway=f"{routing} (direct {direct}, routed {routed})",
            budget=f"<= {budget} us",
            verdict="PASS" if line.rstrip().endswith("PASS") else "FAIL",
        )
    )


def limits_phase(ctx: PhaseContext) -> None:
    iterations = "2000" if ctx.plan.cpu_requests < 1000 else "20000"
    code, out = _run("bench.limits_bench", "--iterations", iterations)
    wanted = {
        "in-process: admit + settle + cost, key+org, 8 counters": (
            "limits: check + settle + cost, 8 limits (us)"
        ),
        "same, no context window (admission estimates the prompt)": "limits: same, no context window (us)",
        "Redis: round trips per request (EVALSHA + batched settles)": (
            "limits with Redis: round trips per request"
        ),
    }
    found = 0
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in wanted:
            continue
        found += 1
        verdict, _, budget = cells[2].partition(" (")
        budget = budget.rstrip(")").replace("budget ", "<= ")
        ctx.rows.append(
            Row(
                metric=wanted[cells[0]],
                gateway=cells[1],
                budget=budget or "<= 15 us",
                verdict=verdict,
            )
        )
    if not found:
        ctx.notes.append(f"limits bench failed (exit {code}): {out.strip()[-300:]}")


def metrics_phase(ctx: PhaseContext) -> None:
    code, out = _run("bench.metrics_bench")
    found = 0
    for line in out.splitlines():
        match = re.match(r"(single process|multiprocess \(--workers N\))\s+([\d.]+)\s+([\d.]+)\s+(.*)", line)
        if match is None:
            continue
        found += 1
        name, us, budget, verdict = match.groups()
        ctx.rows.append(
            Row(
                metric=f"metrics: CPU per request of the metric updates, {name} (us)",
                gateway=us,
                budget=f"<= {budget} us",
                verdict="PASS" if verdict.strip() == "ok" else "FAIL",
            )
        )
    if not found:
        ctx.notes.append(f"metrics bench failed (exit {code}): {out.strip()[-300:]}")


PHASES: list[Callable[[PhaseContext], None]] = [routing_phase, limits_phase, metrics_phase]
