"""The socket backend against a real Unix stream listener: records, missing and dead sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from server.traces.base import TraceRecord, new_trace_id
from server.traces.socket import PROTOCOL_VERSION, SocketTraceBackend, to_record
from server.traces.writer import TraceWriter


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # tmp_path can exceed the 108-byte limit of a Unix socket path.
    with tempfile.TemporaryDirectory(prefix="llmgw-sock-") as directory:
        yield Path(directory) / "telemetry.sock"


class Sidecar:
    """A Unix stream listener that collects NDJSON lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, object]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while line := await reader.readline():
            self.lines.append(orjson.loads(line))
        writer.close()
        await writer.wait_closed()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.path.unlink(missing_ok=True)


@pytest.fixture
async def sidecar(socket_path: Path) -> AsyncIterator[Sidecar]:
    server = Sidecar(socket_path)
    await server.start()
    yield server
    if server.server is not None and server.server.is_serving():
        await server.stop()


def full_record(**overrides: object) -> TraceRecord:
    record = TraceRecord(
        id=new_trace_id(),
        created_at=datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
        organization_id="org-1",
        user_id="user-1",
        step_id="step-1",
        agent_id="agent-1",
        agent_tags=["a", "b"],
        run_id="run-1",
        call_type="summarization",
        provider="openai",
        model="gpt-4o-mini",
        request_json='{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi\\n"}]}',
        response_json='{"choices": [{"message": {"content": "hello"}}]}',
        llm_config_json='{"model": "gpt-4o-mini", "context_window": 128000}',
    )
    for key, value in overrides.items():
        setattr(record, key, value)
    return record


def test_record_has_the_seed_fields() -> None:
    record = to_record(full_record())
    assert record["protocol_version"] == PROTOCOL_VERSION
    assert record["type"] == "summarization"
    assert record["tags"] == ["a", "b"]
    assert record["request"] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi\n"}]}
    assert record["response"] == {"choices": [{"message": {"content": "hello"}}]}
    assert record["error"] is None
    assert record["timestamp"] == "2025-03-04T05:06:07.890123Z"
    assert record["llm_config"] == {"model": "gpt-4o-mini", "context_window": 128000}
    for name in ("provider_trace_id", "agent_id", "run_id", "step_id", "org_id", "user_id"):
        assert isinstance(record[name], str) and record[name]


def test_failed_call_has_null_response_and_the_error() -> None:
    record = to_record(
        full_record(response_json="", error_type="UpstreamUnavailable", error_message="502 from upstream")
    )
    assert record["response"] is None
    assert record["error"] == "502 from upstream"
    assert record["error_type"] == "UpstreamUnavailable"


def test_default_type_is_agent_step() -> None:
    assert to_record(full_record(call_type=""))["type"] == "agent_step"


async def test_sends_one_ndjson_line_per_trace(sidecar: Sidecar, socket_path: Path) -> None:
    backend = SocketTraceBackend(str(socket_path))
    assert backend.readable is False
    records = [full_record(step_id=f"step-{i}") for i in range(300)]
    await backend.write_batch(records=records[:100])
    await backend.write_batch(records=records[100:])
    await _until(lambda: len(sidecar.lines) == 300)
    assert [line["provider_trace_id"] for line in sidecar.lines] == [r.id for r in records]
    assert backend.sent == 300 and backend.undelivered == 0


async def test_missing_socket_is_a_warning_and_a_counter(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SocketTraceBackend(str(socket_path))
    with caplog.at_level(logging.WARNING, logger="server.traces.socket"):
        for _ in range(5):
            await backend.write_batch(records=[full_record(), full_record()])
    assert backend.undelivered == 10 and backend.failed_connections == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited
    assert "hello" not in warnings[0].getMessage()  # never the record's contents


async def test_refused_socket_file_without_listener(socket_path: Path) -> None:
    # A stale socket file left by a dead sidecar: connect() is refused.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()
    backend = SocketTraceBackend(str(socket_path))
    await backend.write_batch(records=[full_record()])
    assert backend.undelivered == 1


async def test_reconnects_when_the_sidecar_comes_back(socket_path: Path) -> None:
    backend = SocketTraceBackend(str(socket_path))
    await backend.write_batch(records=[full_record()])
    assert backend.undelivered == 1
    sidecar = Sidecar(socket_path)
    await sidecar.start()
    try:
        await backend.write_batch(records=[full_record(step_id="after")])
        await _until(lambda: len(sidecar.lines) == 1)
        assert sidecar.lines[0]["step_id"] == "after"
        await sidecar.stop()
        await backend.write_batch(records=[full_record()])  # dead again: counted, no exception
        assert backend.undelivered == 2
        await sidecar.start()
        await backend.write_batch(records=[full_record(step_id="again")])
        await _until(lambda: len(sidecar.lines) == 2)
    finally:
        await sidecar.stop()


async def test_a_sidecar_that_stops_reading_times_out(socket_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_unix_server(never_read, path=str(socket_path))
    try:
        backend = SocketTraceBackend(str(socket_path), timeout=0.3)
        big = full_record(request_json='{"x": "' + "y" * 200_000 + '"}')
        await backend.write_batch(records=[big] * 100)  # ~20 MB, far more than the socket buffers
        assert backend.undelivered == 100
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_through_the_writer(sidecar: Sidecar, socket_path: Path) -> None:
    writer = TraceWriter([SocketTraceBackend(str(socket_path))], batch_size=50)
    await writer.start()
    for i in range(500):
        writer.enqueue(full_record(step_id=f"s{i}"))
    await writer.close(timeout=10)
    await _until(lambda: len(sidecar.lines) == 500)
    assert writer.stats_for("socket").written == 500


async def _until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
