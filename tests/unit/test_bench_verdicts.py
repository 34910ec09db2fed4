"""The bench gives no verdict from a bare forwarder that failed (bench/runner.py).

A forwarder whose upstream calls failed measured an error path (a gRPC error is HTTP 200 to
h2load, so only the floor's log says so). Its number calibrates two budgets: the unary budget
scaled to this machine and the ratio to the bare aiohttp forwarder. Those rows must read n/a,
not OK or OVER against an error path's cost.
"""

from __future__ import annotations

import math

from bench.load import LoadResult
from bench.runner import _check, _forwarder_us


def _forwarder(errors: int) -> LoadResult:
    return LoadResult(requests=1000, errors=errors, wall=1.0, latencies_us=[], cpu={"gw": 0.1})


def test_a_failed_forwarder_has_no_cost_per_request() -> None:
    assert _forwarder_us(_forwarder(errors=0)) == 100.0
    assert math.isnan(_forwarder_us(_forwarder(errors=1)))


def test_a_budget_from_a_failed_calibration_gives_no_verdict() -> None:
    scaled_budget = 450.0 * _forwarder_us(_forwarder(errors=1)) / 340.0
    assert _check(300.0, scaled_budget) == "n/a"
    assert _check(300.0, 450.0) == "ok"
    assert _check(500.0, 450.0) == "OVER"
