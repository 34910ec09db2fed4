"""The held-streams delay verdict judges only runs whose floor was below saturation."""

from __future__ import annotations

from bench.held import HeldResult
from bench.runner import _held_delay_verdict


def held(steady_cores: float) -> HeldResult:
    return HeldResult(
        streams=500, ok=500, failed=0, first_error="", chunks=100_000, wall=10.0, cpu=5.0,
        client_cpu=1.0, rss_before=0, rss_peak=0, rss_after=0, fds_before=0, fds_held=0,
        p50_us=1000.0, p99_us=5000.0, max_us=9000.0, steady_cores=steady_cores,
    )  # fmt: skip


def test_a_saturated_floor_is_not_judged_even_when_the_difference_is_negative() -> None:
    assert _held_delay_verdict(-54_233.0, held(0.87), held(0.99)) == "not judged (floor saturated)"
    assert _held_delay_verdict(100.0, held(0.95), held(0.99)) == "not judged (gateway, floor saturated)"


def test_below_saturation_the_budget_decides() -> None:
    assert _held_delay_verdict(4_000.0, held(0.6), held(0.5)) == "ok"
    assert _held_delay_verdict(6_000.0, held(0.6), held(0.5)) != "ok"
    assert _held_delay_verdict(4_000.0, held(0.95), held(0.5)) == "ok (gateway saturated)"
    assert _held_delay_verdict(4_000.0, held(0.6), None) == "not judged (no floor run)"
