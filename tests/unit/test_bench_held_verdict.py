"""The held-streams delay verdict judges only runs whose floor was below saturation."""

from __future__ import annotations

from bench.held import HeldResult
from bench.runner import Report, _held_delay_verdict, add_delay_rows


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


def delays(whole_p99: float, steady_p99: float, steady_chunks: int = 50_000) -> HeldResult:
    result = held(0.6)
    result.p99_us, result.steady_p99_us, result.steady_p50_us = whole_p99, steady_p99, 800.0
    result.steady_chunks = steady_chunks
    return result


def judged(report: Report) -> dict[str, str]:
    return {row.metric: row.verdict for row in report.rows if row.budget}


def test_the_budget_is_judged_on_the_steady_state_when_both_runs_saw_one() -> None:
    # Ramp and tail (streams starting and ending) push the whole round's p99 over; the state of
    # 500 streams held, every one relaying, is within the budget: the steady row decides.
    report = Report()
    add_delay_rows(report, "held 500", delays(90_000.0, 7_000.0), delays(20_000.0, 4_000.0), budgeted=True)
    assert judged(report) == {"held 500: added inter-chunk delay p99, steady (gw / floor)": "ok"}
    whole = next(r for r in report.rows if r.metric == "held 500: added inter-chunk delay p99 (gw / floor)")
    assert whole.gateway.startswith("70,000 us")  # still printed, not judged

    report = Report()
    add_delay_rows(report, "held 500", delays(9_000.0, 12_000.0), delays(8_000.0, 4_000.0), budgeted=True)
    assert list(judged(report).values()) == ["OVER"]


def test_without_a_steady_state_in_both_runs_the_whole_round_is_judged() -> None:
    report = Report()
    add_delay_rows(report, "held 500", delays(9_000.0, 0.0, 0), delays(2_000.0, 1_000.0), budgeted=True)
    assert list(judged(report)) == ["held 500: added inter-chunk delay p99 (gw / floor)"]
    assert list(judged(report).values()) == ["OVER"]
    assert not any("steady" in row.metric for row in report.rows)


def test_an_unbudgeted_count_is_printed_without_a_verdict() -> None:
    report = Report()
    add_delay_rows(report, "held 2,000", delays(90_000.0, 7_000.0), delays(20_000.0, 4_000.0), budgeted=False)
    assert judged(report) == {}
    assert len(report.rows) == 4
