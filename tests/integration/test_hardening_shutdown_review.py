"""Review of the shutdown work (issue 12, item 13), from outside: the real `llm-gateway serve` as a
subprocess, real loopback upstreams and trace backends, signals sent the way operators send them.

- A signal that arrives while the server is still starting stops it cleanly (exit 0), instead of
  killing it (exit -15, a KeyboardInterrupt traceback for SIGINT) or, as PID 1 in a container
  where an unhandled SIGTERM is ignored, being lost.
- `--workers 2`: SIGTERM to the parent reaches every worker and every worker's traces are written
  (a worker that dies is restarted: tests/integration/test_ops_processes.py).
- A unary call sleeping in its retry backoff when the grace period ends is cut with
  UNAVAILABLE SHUTTING_DOWN and traced; grace 0 cuts at once; a trace backend hanging at shutdown
  delays the exit by a bounded time, and its unwritten traces are counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.integration.test_hardening_shutdown import error_reason, stored_traces, traced
from tests.process_harness import REPO_ROOT, clean_env, start_server_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SilentHttp:
    """A loopback TCP server that accepts connections and never answers (a hung backend)."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentHttp:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self.server is not None
        self.server.close()


def children(pid: int) -> list[int]:
    """The worker processes of a parent (`--workers N`, spawned: their command line says so)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    workers = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(kid)
        except OSError:
            pass
    return workers


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# -- a signal during start-up ------------------------------------------------------------------


async def _signal_during_startup(tmp_path: Path, signum: int) -> tuple[int, str, float]:
    async with SilentHttp() as hung:
        args = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--sqlite-path",
            str(tmp_path / "gateway.db"),
            "--log-level",
            "INFO",
        ]
        # The reader backend is a ClickHouse that never answers: start-up waits for it (10 s).
        env = clean_env(
            {
                "LLMGW_TRACE_BACKENDS": "clickhouse,sqlite",
                "LLMGW_CLICKHOUSE_URL": f"http://127.0.0.1:{hung.port}",
            }
        )
        process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            end = time.monotonic() + 20
            while hung.connections == 0 and time.monotonic() < end and process.poll() is None:
                await asyncio.sleep(0.02)
            assert hung.connections, "the server never reached its trace backend"
            process.send_signal(signum)
            sent = time.monotonic()
            code = await asyncio.to_thread(process.wait, 20)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
            _, err = await asyncio.to_thread(process.communicate)
    return code, err, took


async def test_sigterm_during_startup_stops_cleanly(tmp_path: Path) -> None:
    code, log, took = await _signal_during_startup(tmp_path, signal.SIGTERM)
    assert code == 0, f"exit {code} on a SIGTERM during start-up:\n{log[-3000:]}"
    assert took < 8, f"{took:.1f} s to stop a server that was still starting"
    assert "Traceback" not in log, log[-3000:]


async def test_sigint_during_startup_stops_cleanly(tmp_path: Path) -> None:
    code, log, took = await _signal_during_startup(tmp_path, signal.SIGINT)
    assert code == 0, f"exit {code} on a SIGINT during start-up:\n{log[-3000:]}"
    assert took < 8, f"{took:.1f} s to stop a server that was still starting"
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log[-3000:]


# -- --workers 2 -------------------------------------------------------------------------------


# A killed worker is restarted now (issue 15): tests/integration/test_ops_processes.py.


async def test_workers_2_sigterm_cuts_and_traces_every_stream_of_every_worker(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    count = 8
    words = [f"w{i} " for i in range(60)]
    upstream.script(*(Reply(sse=text_stream(words), chunk_delay=0.2) for _ in range(count)))
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        listen=f"127.0.0.1:{free_port()}",
        allowed_endpoints=[upstream.base_url],
        extra_args=["--workers", "2", "--grace-period", "1"],
        sqlite_path=db,
    )
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(count)]
    try:
        streams = [
            chat_pb2_grpc.ChatCompletionServiceStub(channels[i]).StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(traced(upstream, f"s{i}").SerializeToString()),
                timeout=60,
            )
            for i in range(count)
        ]
        for s in streams:
            await s.read()
        workers = children(server.pid)
        assert len(workers) == 2, workers
        server.send_signal(signal.SIGTERM)

        async def drain(i: int) -> None:
            while await streams[i].read() is not grpc.aio.EOF:
                pass

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(drain(i) for i in range(count)), return_exceptions=True), 30
        )
        code = await asyncio.to_thread(server.wait, 30)
    finally:
        for channel in channels:
            await channel.close()
        server.close()
    assert code == 0, server.log[-3000:]
    assert not [w for w in workers if alive(w)], "a worker outlived its parent"
    for i, outcome in enumerate(outcomes):
        assert isinstance(outcome, grpc.aio.AioRpcError), (i, outcome)
        assert error_reason(outcome) == "SHUTTING_DOWN", (i, outcome.code(), outcome.details())
    traces = stored_traces(db)
    missing = [f"s{i}" for i in range(count) if f"s{i}" not in traces]
    assert not missing, f"{missing} lost:\n{server.log[-3000:]}"
    assert {traces[f"s{i}"][0] for i in range(count)} == {"SHUTTING_DOWN"}


# -- the grace period's end --------------------------------------------------------------------


async def test_a_call_in_retry_backoff_at_the_grace_end_is_cut_and_traced(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # 429 with Retry-After 20: the gateway sleeps in its backoff far past the 1 s grace period.
    upstream.default = Reply(
        status=429, json_body={"error": {"message": "slow down"}}, headers={"Retry-After": "20"}
    )
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "1"],
        sqlite_path=db,
        env={"LLMGW_RETRY_MAX_ATTEMPTS": "3", "LLMGW_RETRY_MAX_DELAY": "30"},
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            call = chat.Create(traced(upstream, "backoff"), timeout=60)
            end = time.monotonic() + 10
            while not upstream.requests and time.monotonic() < end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            server.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(call, 20)
                outcome: object = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc
            code = await asyncio.to_thread(server.wait, 20)
            took = time.monotonic() - sent
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert error_reason(outcome) in ("SHUTTING_DOWN", "UPSTREAM_RATE_LIMITED"), (
        outcome.code(),
        outcome.details(),
    )
    assert took < 10, f"{took:.1f} s to stop"
    traces = stored_traces(db)
    assert "backoff" in traces, server.log[-3000:]


async def test_grace_zero_cuts_a_stream_at_once_and_traces_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_stream([f"w{i} " for i in range(60)]), chunk_delay=0.2))
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        env={"LLMGW_GRACE_PERIOD": "0"},
        sqlite_path=db,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(traced(upstream, "g0").SerializeToString()),
                timeout=60,
            )
            await stream.read()
            server.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                while await stream.read() is not grpc.aio.EOF:
                    pass
                outcome: object = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc
            code = await asyncio.to_thread(server.wait, 20)
            took = time.monotonic() - sent
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    assert isinstance(outcome, grpc.aio.AioRpcError) and error_reason(outcome) == "SHUTTING_DOWN", outcome
    assert took < 8, took
    assert stored_traces(db).get("g0", ("",))[0] == "SHUTTING_DOWN", server.log[-3000:]


async def test_a_hung_trace_backend_at_shutdown_is_bounded_and_counted(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.default = Reply(json_body=completion())
    db = tmp_path / "gateway.db"
    async with SilentHttp() as hung:
        # sqlite reads (and starts at once); the ClickHouse copy hangs on every request.
        server = await asyncio.to_thread(
            start_server_process,
            tmp_path,
            allowed_endpoints=[upstream.base_url],
            extra_args=["--grace-period", "1"],
            sqlite_path=db,
            env={
                "LLMGW_TRACE_BACKENDS": "sqlite,clickhouse",
                "LLMGW_CLICKHOUSE_URL": f"http://127.0.0.1:{hung.port}",
            },
        )
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                for i in range(3):
                    await chat.Create(traced(upstream, f"h{i}"), timeout=30)
            sent = time.monotonic()
            code = await asyncio.to_thread(server.stop, signal.SIGTERM, 30.0)
            took = time.monotonic() - sent
        finally:
            server.close()
    assert code == 0, server.log[-3000:]
    # grace 1 s + the writer's flush bound (max(grace, 5 s)) + the backend's close bound (5 s).
    assert took < 14, f"{took:.1f} s to stop with a hung trace backend:\n{server.log[-2000:]}"
    assert {f"h{i}" for i in range(3)} <= set(stored_traces(db)), server.log[-3000:]
    assert "clickhouse" in server.log and "not written" in server.log, server.log[-3000:]


async def test_a_stream_whose_completion_is_being_written_at_the_cut_ends_ok(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # The whole answer comes at once: one ~40 KB delta fits the caller's 64 KB flow-control window,
    # the ~40 KB completion does not, so grpc's write of the completion waits for the caller, who
    # reads nothing until the grace period is over. The stream had nothing left to send: it must
    # end OK, not with the completion followed by UNAVAILABLE SHUTTING_DOWN.
    text = "x" * 40_000
    upstream.script(Reply(sse=text_stream([text])))
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "1"],
        sqlite_path=db,
    )
    try:
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(server.address, options=options) as channel:
            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(traced(upstream, "c0").SerializeToString()),
                timeout=60,
            )
            end = time.monotonic() + 10
            while not upstream.requests and time.monotonic() < end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the answer is relayed; the completion's write is waiting
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(2.5)  # past the grace period and the cut
            events = []
            try:
                while (event := await stream.read()) is not grpc.aio.EOF:
                    events.append(event.WhichOneof("event"))
                outcome: object = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc
            code = await asyncio.to_thread(server.wait, 20)
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    assert events and events[-1] == "completion", events
    assert outcome == "OK", f"a complete answer ended with {outcome!r} after {events}"
    assert stored_traces(db).get("c0", ("?",))[0] == "", server.log[-3000:]


async def test_a_second_sigterm_and_a_caller_leaving_during_the_grace_period(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # Two streams: one whose caller cancels during the grace period, one cut at its end; a second
    # SIGTERM (an impatient operator) during the grace period changes nothing.
    words = [f"w{i} " for i in range(60)]
    upstream.script(*(Reply(sse=text_stream(words), chunk_delay=0.2) for _ in range(2)))
    db = tmp_path / "gateway.db"
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", "2"],
        sqlite_path=db,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            leaving, staying = (
                chat.StreamCreate(
                    chat_pb2.StreamCreateRequest.FromString(traced(upstream, step).SerializeToString()),
                    timeout=60,
                )
                for step in ("leaves", "stays")
            )
            await leaving.read()
            await staying.read()
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            leaving.cancel()
            server.send_signal(signal.SIGTERM)
            try:
                while await staying.read() is not grpc.aio.EOF:
                    pass
                outcome: object = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc
            code = await asyncio.to_thread(server.wait, 20)
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    assert isinstance(outcome, grpc.aio.AioRpcError) and error_reason(outcome) == "SHUTTING_DOWN", outcome
    traces = stored_traces(db)
    assert traces.get("leaves", ("?",))[0] == "CANCELLED", (traces, server.log[-2000:])
    assert traces.get("stays", ("?",))[0] == "SHUTTING_DOWN", (traces, server.log[-2000:])
