"""gRPC core settings the gateway applies before grpc loads (environment variables gRPC reads).

`GRPC_EXPERIMENTS`: grpc 1.85 runs server I/O on its EventEngine threads by default, and
grpc.aio then hands every completion from an EventEngine thread to its poller thread to the
event loop. Turning the EventEngine listener, endpoints and callback completion queue off puts
the server back on the epoll-based iomgr path (grpc's default for years before), which saves
one thread hop per event. Measured on the benchmark (2 vCPU, gateway pinned to one core):
~5-10% less CPU per unary request (~520 vs ~555 us) and per bare grpc.aio call (~210-240 vs
~240-270 us); the whole test suite passes on it. An operator's own `GRPC_EXPERIMENTS` wins
(set it to an empty string for grpc's stock behaviour).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints,-event_engine_callback_cq"


def apply_grpc_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the gateway's gRPC defaults unless the environment already chose; call before grpc loads."""
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
