"""Write-only traces for a sidecar: one NDJSON record per trace over a Unix stream socket.

The record keeps the seed's fields (and its protocol version) so the seed's sidecar reads it.
The sidecar is optional: a missing, refusing or dead socket costs a rate-limited warning and
the `undelivered` counter, never an exception to the writer, and the next batch reconnects.
Each batch uses one connection, so a restarted sidecar is picked up without stale sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC
from typing import Any

import orjson

from server.traces.base import RateLimitedLog, TraceBackend, TraceRecord

log = logging.getLogger(__name__)

# The seed's sidecar protocol version: v2 added org_id, user_id and llm_config.
PROTOCOL_VERSION = 3


def _json_or_none(text: str) -> Any:
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # not JSON after all: pass it on as a string rather than lose it


def to_record(trace: TraceRecord) -> dict[str, Any]:
    """The sidecar record of one trace."""
    failed = bool(trace.error_type or trace.error_message)
    request = _json_or_none(trace.request_json)
    return {
        "protocol_version": PROTOCOL_VERSION,
        "provider_trace_id": trace.id,
        "agent_id": trace.agent_id,
        "run_id": trace.run_id,
        "step_id": trace.step_id,
        "tags": list(trace.agent_tags),
        "type": trace.call_type or "agent_step",
        "request": request if request is not None else {},
        "response": None if failed else _json_or_none(trace.response_json),
        "error": (trace.error_message or trace.error_type) if failed else None,
        "error_type": trace.error_type or None,
        "timestamp": trace.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "org_id": trace.organization_id,
        "user_id": trace.user_id,
        "llm_config": _json_or_none(trace.llm_config_json),
        "provider": trace.provider,
        "model": trace.model,
        "is_byok": trace.is_byok,
        "latency_ms": trace.latency_ms,
        # Not in the seed's record: parameters the provider was not sent as given (issue 13).
        "notes": list(trace.notes),
        # Routed calls (issue 16); absent keys read as a direct call in the seed's sidecar.
        "route": trace.route or None,
        "deployment": trace.deployment or None,
        "attempts": _json_or_none(trace.attempts_json),
        # Exact decimal string of US dollars; null when unpriced (issue 17).
        "cost_usd": trace.cost_usd,
    }


def encode_batch(records: Sequence[TraceRecord]) -> bytes:
    """NDJSON: one record a line, each line ending in a newline."""
    return b"".join(orjson.dumps(to_record(r)) + b"\n" for r in records)


class SocketTraceBackend(TraceBackend):
    """Sends each trace to a Unix stream socket; reads are not supported."""

    name = "socket"
    readable = False

    def __init__(self, path: str, *, timeout: float = 5.0, warn_interval: float = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._warn = RateLimitedLog(log, warn_interval)
        self.sent = 0  # traces handed to the socket
        self.undelivered = 0  # traces lost to a missing or dead socket
        self.failed_connections = 0

    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        if not records:
            return
        payload = encode_batch(records)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                _, writer = await asyncio.open_unix_connection(self.path)
                writer.write(payload)
                writer.write_eof()  # tells the sidecar the batch is complete
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except asyncio.CancelledError:
            if writer is not None:
                writer.transport.abort()
            raise
        except (OSError, TimeoutError) as exc:
            if writer is not None:
                writer.transport.abort()  # never wait on a peer that stopped reading
            self.failed_connections += 1
            self.undelivered += len(records)
            self._warn.warning(
                "socket",
                "trace socket %s unavailable (%s); %d traces not delivered so far",
                self.path,
                type(exc).__name__,
                self.undelivered,
            )
            return
        self.sent += len(records)
