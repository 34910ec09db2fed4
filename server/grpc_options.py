"""gRPC server options for running behind load balancers: connection age and keepalive.

gRPC keeps one long-lived HTTP/2 connection per client and multiplexes every call on it, so a
connection-level balancer (a Kubernetes Service, a cloud L4 balancer) pins each client to the
replica it first reached: replicas added later get no traffic from existing clients. And a
connection that carries no bytes for a while (a stream waiting for a slow model's first token)
looks idle to NAT tables and proxies with idle timeouts, which drop it silently.

- `LLMGW_GRPC_MAX_CONNECTION_AGE` (300 s): the server sends GOAWAY to a connection this old
  (grpc adds +-10% jitter so clients do not reconnect in step). New calls then go on a new
  connection, which the balancer may send elsewhere: clients re-balance within this bound.
  Calls already running are not touched. 0 turns it off.
- `LLMGW_GRPC_MAX_CONNECTION_AGE_GRACE` (3600 s): how long the calls still running on an aged
  connection may go on before grpc closes it (they then fail UNAVAILABLE). It must cover the
  longest call: a stream may wait `LLMGW_UPSTREAM_TIMEOUT` (600 s) for its first token and then
  generate for minutes, so the default is an hour.
- `LLMGW_GRPC_KEEPALIVE_TIME` (60 s) / `LLMGW_GRPC_KEEPALIVE_TIMEOUT` (20 s): the server pings
  each connection after this much silence, and closes it when the ping is not answered in time.
  The pings keep NAT and balancer idle timers (typically 240-600 s) from expiring under a quiet
  stream, and free the calls of a client that vanished (host gone, cable cut) within ~80 s
  instead of the kernel's ~2 h. `grpc.http2.max_pings_without_data` 0: grpc otherwise stops
  pinging after two pings without data, exactly while a stream waits for its first token.
- `LLMGW_GRPC_MIN_PING_INTERVAL` (10 s): the shortest interval at which a client may ping. A
  client pinging more often gets GOAWAY `too_many_pings` after two strikes, so set clients'
  keepalive time at or above it. Pings are allowed on connections without calls (a pooled client
  connection stays warm). At least 1 s: pings need no gateway key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import Settings

# Settings field -> its environment variable, for messages.
_FIELDS = (
    "grpc_max_connection_age",
    "grpc_max_connection_age_grace",
    "grpc_keepalive_time",
    "grpc_keepalive_timeout",
    "grpc_min_ping_interval",
)
MIN_PING_INTERVAL_FLOOR = 1.0
# grpc takes int milliseconds; past 2**31 - 1 ms (~24.8 days) it means "forever" anyway.
_MAX_MS = 2**31 - 1


def _ms(seconds: float) -> int:
    return min(_MAX_MS, round(seconds * 1000))


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """The grpc server options for `settings`' connection age and keepalive."""
    options = [
        ("grpc.keepalive_time_ms", _ms(settings.grpc_keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(settings.grpc_keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.grpc_min_ping_interval)),
    ]
    if settings.grpc_max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.grpc_max_connection_age_grace)),
        ]
    return options


def connection_problems(settings: Settings) -> list[str]:
    """Why these connection settings cannot work (empty when they can)."""
    problems = []
    for name in _FIELDS:
        value = getattr(settings, name)
        if not value >= 0:  # also refuses NaN
            problems.append(f"LLMGW_{name.upper()} must be a number of seconds >= 0")
    if settings.grpc_keepalive_time <= 0 or settings.grpc_keepalive_timeout <= 0:
        problems.append("LLMGW_GRPC_KEEPALIVE_TIME and LLMGW_GRPC_KEEPALIVE_TIMEOUT must be above 0")
    if settings.grpc_min_ping_interval < MIN_PING_INTERVAL_FLOOR:
        # Pings need no gateway key: with no floor any client could keep the server answering them.
        problems.append(f"LLMGW_GRPC_MIN_PING_INTERVAL must be at least {MIN_PING_INTERVAL_FLOOR:g} s")
    return problems
