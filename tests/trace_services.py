"""Start and stop a real PostgreSQL and a real ClickHouse for the trace tests.

Each server runs from a fresh temporary directory on a free loopback port and is removed
after. Missing binaries are installed with `scripts/install-test-services` (Debian packages);
if that fails the caller gets an error, never a skip. As root, PostgreSQL runs as the
`postgres` system user (or `nobody`), since it refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "scripts" / "install-test-services"


class ServiceError(RuntimeError):
    """A test server could not be installed or started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_postgres_bin() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for directory in candidates:
        if Path(directory, "initdb").exists() and Path(directory, "postgres").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb:
        real = Path(initdb).resolve().parent
        if (real / "postgres").exists():
            return real
    return None


def _find_clickhouse() -> list[str] | None:
    for name in ("clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        path = shutil.which(name)
        if path:
            return [path]
    path = shutil.which("clickhouse")
    return [path, "server"] if path else None


def _install() -> None:
    result = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise ServiceError(
            f"{INSTALL_SCRIPT} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def postgres_bin() -> Path:
    """The directory of `initdb` and `postgres`, installing PostgreSQL when missing."""
    found = _find_postgres_bin()
    if found is None:
        _install()
        found = _find_postgres_bin()
    if found is None:
        raise ServiceError("PostgreSQL binaries not found after scripts/install-test-services")
    return found


def clickhouse_command() -> list[str]:
    """The command that runs a ClickHouse server, installing it when missing."""
    found = _find_clickhouse()
    if found is None:
        _install()
        found = _find_clickhouse()
    if found is None:
        raise ServiceError("clickhouse-server not found after scripts/install-test-services")
    return found


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run a server as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServiceError("running as root and neither the postgres nor the nobody user exists")


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@dataclass
class PostgresServer:
    """A running PostgreSQL; `dsn` connects as the superuser with a password over TCP."""

    workdir: Path
    port: int
    password: str
    process: subprocess.Popen[bytes]
    log_path: Path
    user: str = "postgres"
    socket_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.socket_dir = self.workdir

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        _stop(self.process, signal.SIGINT, 30)  # SIGINT: fast shutdown
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres(timeout: float = 60.0) -> PostgresServer:
    """initdb into a temp dir and start `postgres` on a free loopback port."""
    bindir = postgres_bin()
    owner = _unprivileged_user()
    workdir = Path(tempfile.mkdtemp(prefix="llmgw-pg-"))
    data = workdir / "data"
    log_path = workdir / "postgres.log"
    password = secrets.token_urlsafe(16)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n")
    # Switch user with setpriv rather than Popen(user=...): Popen's user switching forks without
    # exec first, and a fork of a process running gRPC's event engine can crash in the child
    # (seen: postgres "exited (-11)" after grpc tests ran in the same pytest process).
    run_as: list[str] = []
    if owner is not None:
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        run_as = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups", "--"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    process: subprocess.Popen[bytes] | None = None
    try:
        result = subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
             "--no-sync"],
            cwd=workdir, env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceError(f"initdb failed: {result.stderr.decode(errors='replace')[-2000:]}")
        port = free_port()
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
                 "-c", "synchronous_commit=off", "-c", "max_connections=50"],
                cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        server = PostgresServer(workdir, port, password, process, log_path)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServiceError(f"postgres exited ({process.returncode}):\n{_log_tail(log_path)}")
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True, timeout=10, check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return server
            if time.monotonic() > deadline:
                server.stop()
                raise ServiceError(f"postgres not ready after {timeout}s:\n{_log_tail(log_path)}")
            time.sleep(0.1)
    except BaseException:
        if process is not None:
            _stop(process, signal.SIGKILL, 10)
        shutil.rmtree(workdir, ignore_errors=True)
        raise


_CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{workdir}/server.log</log><errorlog>{workdir}/server.err.log</errorlog></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{workdir}/data/</path>
  <tmp_path>{workdir}/tmp/</tmp_path>
  <user_files_path>{workdir}/user_files/</user_files_path>
  <format_schema_path>{workdir}/format_schemas/</format_schema_path>
  <users_config>{workdir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
"""

_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password>{password}</password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default></default></quotas>
</yandex>
"""


@dataclass
class ClickHouseServer:
    """A running ClickHouse; `url` carries the default user's password."""

    workdir: Path
    http_port: int
    password: str
    process: subprocess.Popen[bytes]

    def url(self, database: str = "default") -> str:
        return f"http://default:{self.password}@127.0.0.1:{self.http_port}/?database={database}"

    def version(self) -> str:
        return self.query("SELECT version()").strip()

    def query(self, sql: str) -> str:
        """Run one statement over HTTP (for test setup and checks)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/",
            data=sql.encode(),
            headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": self.password},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM, 30)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_clickhouse(timeout: float = 90.0) -> ClickHouseServer:
    """Start clickhouse-server with a generated config in a temp dir on free loopback ports."""
    command = clickhouse_command()
    workdir = Path(tempfile.mkdtemp(prefix="llmgw-ch-"))
    password = secrets.token_urlsafe(16)
    http_port, tcp_port = free_port(), free_port()
    (workdir / "config.xml").write_text(
        _CLICKHOUSE_CONFIG.format(workdir=workdir, http_port=http_port, tcp_port=tcp_port)
    )
    (workdir / "users.xml").write_text(_CLICKHOUSE_USERS.format(password=password))
    process: subprocess.Popen[bytes] | None = None
    try:
        with open(workdir / "stdout.log", "wb") as out:
            process = subprocess.Popen(
                [*command, f"--config-file={workdir / 'config.xml'}"],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        server = ClickHouseServer(workdir, http_port, password, process)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                logs = _log_tail(workdir / "stdout.log") + _log_tail(workdir / "server.err.log")
                raise ServiceError(f"clickhouse-server exited ({process.returncode}):\n{logs}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ping", timeout=2) as response:
                    if response.read().strip() == b"Ok.":
                        return server
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise ServiceError(
                    f"clickhouse not ready after {timeout}s:\n{_log_tail(workdir / 'server.err.log')}"
                )
            time.sleep(0.1)
    except BaseException:
        if process is not None:
            _stop(process, signal.SIGKILL, 10)
        shutil.rmtree(workdir, ignore_errors=True)
        raise


# --- shared pytest fixtures ---------------------------------------------------------------
# tests/conftest.py imports these, so each server starts at most once per session, on first use.


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the whole session (tests/conftest.py makes it session-wide)."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    """One real ClickHouse for the whole session (tests/conftest.py makes it session-wide)."""
    server = start_clickhouse()
    yield server
    server.stop()


async def fresh_postgres_database(server: PostgresServer) -> str:
    """The DSN of a new, empty database on `server`."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.dsn(name)


def fresh_clickhouse_database() -> str:
    """A database name nobody used yet (the ClickHouse trace backend creates it)."""
    return f"t_{uuid.uuid4().hex[:12]}"
