"""Real HTTP proxies on loopback for the egress tests: Debian's tinyproxy, and a small CONNECT
proxy that records what it was asked for (`CONNECT <authority>`) and tunnels to a fixed place."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.trace_services import _install as install_test_services
from tests.trace_services import free_port


@dataclass
class Tinyproxy:
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connects(self) -> list[str]:
        """The CONNECT authorities tinyproxy logged (`Request (file descriptor N): CONNECT a:p HTTP/1.1`)."""
        out = []
        for line in self.log().splitlines():
            if "): CONNECT " in line:
                out.append(line.split("): CONNECT ", 1)[1].split()[0])
        return out


@contextlib.contextmanager
def tinyproxy(directory: Path, *, basic_auth: tuple[str, str] | None = None) -> Iterator[Tinyproxy]:
    """tinyproxy on a free loopback port, every CONNECT port allowed (no ConnectPort line)."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(binary).exists():
        install_test_services()  # scripts/install-test-services; a failure is an error, never a skip
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "tinyproxy.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        f'LogFile "{log_path}"',
        "LogLevel Connect",
        "MaxClients 50",
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        end = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"tinyproxy exited {process.returncode}: {err}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            if time.monotonic() > end:
                raise RuntimeError("tinyproxy did not listen")
            time.sleep(0.05)
        yield Tinyproxy(port, log_path, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()


@dataclass
class RecordingProxy:
    """A CONNECT proxy that writes down each requested authority and its headers, then tunnels
    to `target_port` on loopback whatever was asked (so a tunnel to a public-looking address
    still reaches the test's server)."""

    target_port: int
    port: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *header_lines = head.decode("latin-1").split("\r\n")
            method, authority, _ = line.split(" ", 2)
            headers = {}
            for h in header_lines:
                if ":" in h:
                    name, value = h.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            self.requests.append((authority, headers))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
