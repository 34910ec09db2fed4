"""The provider-trace record and the interface every trace backend implements.

The request path builds a `TraceRecord` and hands it to the trace writer, which only enqueues;
each backend has its own bounded queue and background task (see `server.traces.writer`).
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime


def new_trace_id() -> str:
    return f"provider_trace-{uuid.uuid4()}"


@dataclass(slots=True)
class TraceRecord:
    """One provider call. JSON fields hold JSON text, already redacted of every key."""

    id: str
    created_at: datetime  # timezone-aware UTC
    organization_id: str = ""
    user_id: str = ""
    step_id: str = ""
    agent_id: str = ""
    agent_tags: list[str] = field(default_factory=list)
    run_id: str = ""
    call_type: str = "agent_step"
    provider: str = ""
    model: str = ""
    model_endpoint_type: str = ""
    is_byok: bool = False
    request_json: str = ""
    response_json: str = ""  # empty when the call failed
    error_type: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    latency_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # streams only
    llm_config_json: str = ""  # the request's LLMConfig as JSON text (socket protocol field)


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """Filters of ListProviderTraces; empty strings and None match everything."""

    organization_id: str
    step_id: str = ""
    run_id: str = ""
    agent_id: str = ""
    start_time: datetime | None = None  # inclusive
    end_time: datetime | None = None  # exclusive
    limit: int = 50
    # Keyset cursor: traces strictly older than (created_at, id) in newest-first order.
    before: tuple[datetime, str] | None = None


class TraceBackend(abc.ABC):
    """A store of traces. Writes are batched by the writer; reads serve the trace RPCs."""

    name: str = "backend"
    readable: bool = True  # False for write-only backends (socket)

    async def start(self) -> None:
        """Connect and migrate. Called once before the first write."""

    async def close(self) -> None:
        """Release connections. Called once after the last write."""

    @abc.abstractmethod
    async def write_batch(self, *, records: Sequence[TraceRecord]) -> None:
        """Persist every record or raise; the writer retries the whole batch."""

    async def get_latest(self, *, organization_id: str, step_id: str) -> TraceRecord | None:
        raise NotImplementedError(f"{self.name} is write-only")

    async def list(self, *, query: TraceQuery) -> list[TraceRecord]:
        raise NotImplementedError(f"{self.name} is write-only")
