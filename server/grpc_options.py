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

And how many calls grpc holds for the worker before it has started them:

- `LLMGW_GRPC_MAX_PENDING_CALLS` (4,000): grpc core parses a new call on its own threads, then
  queues it until the worker's event loop asks for a call; grpc.aio keeps one such request open
  and renews it on a later loop turn, so a burst of new calls on a busy worker (2,000 streams
  opened in two seconds while hundreds relay chunks) waits there for a second or more. grpc's
  own limits on that queue are 1,000 with random early drop up to a hard 3,000, and a call it
  drops is answered a bare CANCELLED (trailers only) that the gateway never sees: a lost answer
  the client did not cancel. This sets both limits to one number, so no call is dropped below
  it. Each queued call costs ~15 KiB plus as much of its request as its HTTP/2 stream window
  let the client send: all of a small request, and for a large one up to the window grpc's
  BDP probing grew, several MiB on a fast link (measured on loopback: 7.6-7.9 MiB per queued
  8 MB request, 5.5-8.8 MiB per 60 MB one), not the 64 MiB message limit. Nothing caps the
  total in bytes (grpc's default resource quota is unlimited), so size it to the worker's
  memory and its callers' requests, e.g. 4,000 x 100 KB prompts ~ 450 MiB: lower it on a small
  host, raise it for bigger bursts, or add workers (each has its own queue, and its own bound).
  A call waits at most `PENDING_CALL_MAX_WAIT` (grpc cancels older ones when the loop next
  asks): only a loop stalled for minutes leaves a call there that long, and the caller's own
  deadline ends the wait sooner (a call whose deadline passed, or whose caller cancelled, while
  queued never reaches the upstream). At SIGTERM the queue is drained or refused, not
  cancelled: server/app.py `GatewayServer.stop`.
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
MAX_PENDING_CALLS_LIMIT = 1_000_000
# Seconds a call may wait in grpc's queue for the event loop (grpc's default, 30 s, is shorter
# than a burst of LLMGW_GRPC_MAX_PENDING_CALLS takes to drain on a loaded worker).
PENDING_CALL_MAX_WAIT = 300
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


def pending_call_options(settings: Settings) -> list[tuple[str, int]]:
    """The grpc server options for the queue of calls not yet started (module docstring)."""
    return [
        # Soft limit = hard limit: grpc's random early drop between the two cancels calls far
        # below the bound, with a bare CANCELLED.
        ("grpc.server.max_pending_requests", settings.grpc_max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.grpc_max_pending_calls),
        ("grpc.server_max_unrequested_time_in_server", PENDING_CALL_MAX_WAIT),
    ]


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
    if not 1 <= settings.grpc_max_pending_calls <= MAX_PENDING_CALLS_LIMIT:
        problems.append(f"LLMGW_GRPC_MAX_PENDING_CALLS must be between 1 and {MAX_PENDING_CALLS_LIMIT}")
    return problems
