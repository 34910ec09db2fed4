"""Connection age and keepalive settings -> grpc server options (server/grpc_options.py)."""

from __future__ import annotations

import pytest

from server.config import Settings, load_settings
from server.grpc_options import connection_options, pending_call_options


def test_defaults_rebalance_every_five_minutes_and_never_cut_a_slow_first_token() -> None:
    options = dict(connection_options(Settings()))
    assert options["grpc.max_connection_age_ms"] == 300_000
    # The grace must outlast a stream's wait for its first token (LLMGW_UPSTREAM_TIMEOUT).
    assert options["grpc.max_connection_age_grace_ms"] > Settings().upstream_timeout * 1000
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    # grpc would stop pinging after two pings without data: exactly while a stream waits.
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000


def test_settings_come_from_the_environment_in_seconds() -> None:
    env = {
        "LLMGW_GRPC_MAX_CONNECTION_AGE": "2.5",
        "LLMGW_GRPC_MAX_CONNECTION_AGE_GRACE": "30",
        "LLMGW_GRPC_KEEPALIVE_TIME": "15",
        "LLMGW_GRPC_KEEPALIVE_TIMEOUT": "5",
        "LLMGW_GRPC_MIN_PING_INTERVAL": "1",
    }
    options = dict(connection_options(load_settings(environ=env)))
    assert options["grpc.max_connection_age_ms"] == 2500
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert options["grpc.keepalive_time_ms"] == 15_000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 1000


def test_age_zero_turns_it_off_and_huge_values_stay_in_grpc_range() -> None:
    options = dict(connection_options(Settings(grpc_max_connection_age=0)))
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_connection_age_grace_ms" not in options
    huge = dict(connection_options(Settings(grpc_max_connection_age_grace=1e12)))
    assert huge["grpc.max_connection_age_grace_ms"] == 2**31 - 1


def test_pending_calls_have_one_bound_and_no_random_early_drop() -> None:
    # grpc's defaults: 1,000, then random drops (a bare CANCELLED) up to a hard 3,000.
    options = dict(pending_call_options(Settings()))
    assert options["grpc.server.max_pending_requests"] == 4_000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 4_000
    # grpc's 30 s would cancel the oldest of a long queue before a loaded worker reached them.
    assert options["grpc.server_max_unrequested_time_in_server"] >= 300
    small = dict(pending_call_options(load_settings(environ={"LLMGW_GRPC_MAX_PENDING_CALLS": "50"})))
    assert small["grpc.server.max_pending_requests"] == 50
    assert small["grpc.server.max_pending_requests_hard_limit"] == 50


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLMGW_GRPC_MAX_CONNECTION_AGE", "-1"),
        ("LLMGW_GRPC_MAX_CONNECTION_AGE_GRACE", "nan"),
        ("LLMGW_GRPC_KEEPALIVE_TIME", "0"),
        ("LLMGW_GRPC_KEEPALIVE_TIMEOUT", "0"),
        ("LLMGW_GRPC_MIN_PING_INTERVAL", "-5"),
        ("LLMGW_GRPC_MIN_PING_INTERVAL", "0.5"),
        ("LLMGW_GRPC_MAX_PENDING_CALLS", "0"),
        ("LLMGW_GRPC_MAX_PENDING_CALLS", "1000001"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name.rsplit("_", 1)[0]):
        load_settings(environ={name: value})
