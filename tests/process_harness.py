"""Run the real gateway as a subprocess (`python -m server serve`), the way operators run it.

`start_server_process` binds `127.0.0.1:0` by default and reads the port the server actually bound
from its start-up log line (`... serving on 127.0.0.1:0 (port 41371) ...`), then waits until the
health check answers SERVING. Stderr is drained by a thread (kept in `ServerProcess.log`), so the
server never blocks on a full pipe. `stop()` sends SIGTERM and waits for the exit code.

Everything here blocks; async tests call it through `asyncio.to_thread` so the fake upstream
running in the test's event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The start-up line of server/app.py: "llm-gateway serving on <listen> (port <n>), ...".
_PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that would change how the server behaves."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLMGW_", "OTEL_", "LETTA_"))
        and k not in ("TELEMETRY_SOCKET", "OPENAI_API_KEY", "OPENROUTER_API_KEY")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    _port_found: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = _PORT_LINE.search(line)
            if match and not self._port_found.is_set():
                self.port = int(match.group(1))
                self._port_found.set()
        self._port_found.set()  # EOF: the process is gone; wake anyone waiting for the port

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait for it; SIGKILL (and a failure) if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.wait(5)
            raise AssertionError(
                f"server did not exit within {timeout} s of signal {signum}:\n{self.log}"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.stderr is not None:
            self.process.stderr.close()


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int:
    """One Health/Check on a fresh channel; the status enum value (raises grpc.RpcError)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return status


def start_server_process(
    tmp_path: Path,
    *,
    allowed_endpoints: Sequence[str] = (),
    listen: str = "127.0.0.1:0",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    sqlite_path: Path | None = None,
    startup_timeout: float = 30.0,
) -> ServerProcess:
    """Start `python -m server serve` and return once it answers health checks with SERVING."""
    args = [
        *(command or (sys.executable, "-m", "server")),
        "serve",
        "--listen",
        listen,
        "--sqlite-path",
        str(sqlite_path or tmp_path / "gateway.db"),
        "--log-level",
        "INFO",
    ]
    if allowed_endpoints:
        args += ["--allowed-endpoints", ",".join(allowed_endpoints)]
    args += list(extra_args)
    process = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        # The admin listener off unless asked for: servers side by side would share its port.
        env=clean_env({"LLMGW_ADMIN_LISTEN": "", **(env or {})}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ServerProcess(process)
    server._reader = threading.Thread(target=server._drain, name=f"server-{process.pid}-stderr", daemon=True)
    server._reader.start()
    try:
        if not server._port_found.wait(startup_timeout) or not server.port:
            raise AssertionError(f"server did not report its port (exit {process.poll()}):\n{server.log}")
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if health_status(server.address) == health_pb2.HealthCheckResponse.SERVING:
                    return server
            except grpc.RpcError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never became healthy (exit {process.poll()}):\n{server.log}")
            time.sleep(0.05)
    except BaseException:
        server.close()
        raise


@contextmanager
def server_process(tmp_path: Path, **kwargs: object) -> Iterator[ServerProcess]:
    """`start_server_process` as a context manager; the server must exit 0 on SIGTERM at the end."""
    server = start_server_process(tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        if server.process.poll() is None:
            code = server.stop()
            assert code == 0, f"server exited {code} on SIGTERM:\n{server.log}"
        else:
            server.close()


@asynccontextmanager
async def async_server_process(tmp_path: Path, **kwargs: object) -> AsyncIterator[ServerProcess]:
    """`server_process` for async tests: starting and stopping never block the event loop."""
    server = await asyncio.to_thread(lambda: start_server_process(tmp_path, **kwargs))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        if server.process.poll() is None:
            code = await asyncio.to_thread(server.stop)
            assert code == 0, f"server exited {code} on SIGTERM:\n{server.log}"
        else:
            server.close()


def tool_path(name: str) -> str:
    """A tool installed in the project's venv (grpcurl, buf, llm-gateway)."""
    path = VENV_BIN / name
    if not path.exists():
        raise AssertionError(f"{name} is not installed in {VENV_BIN}: run `make setup`")
    return str(path)
