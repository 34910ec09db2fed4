"""Issue 15, items 3 and 5, against the real PostgreSQL of the test session.

- Where keys live is explicit: `LLMGW_POSTGRES_DSN` alone no longer moves keys; keys kept in
  Postgres by an older version are not silently lost (the server refuses to start, naming
  `LLMGW_KEY_STORE=postgres`), `LLMGW_KEY_STORE=postgres` serves them, the start-up log and the
  `keys` commands say where keys and traces live (never with the database password).
- Health tells the truth: NOT_SERVING while the Postgres key store is unreachable with auth on,
  SERVING again when it is back; a trace backend that is down leaves health SERVING and is
  counted (`server.serving_health.COUNTERS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.auth.store_postgres import PostgresAuthStore
from server.serving_health import COUNTERS
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.process_harness import REPO_ROOT, clean_env, server_process
from tests.trace_polling import wait_for_count
from tests.trace_services import PostgresServer, free_port, fresh_postgres_database

PASSWORD = "dsn-S3cret-password"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO_ROOT,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_keys_kept_in_postgres_by_an_older_version_stop_the_server_from_starting(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    async with PostgresAuthStore(dsn=dsn) as old:  # what LLMGW_POSTGRES_DSN alone used to do
        await old.create_key(organization_id="acme")
    db = tmp_path / "gateway.db"
    done = await asyncio.to_thread(
        run_cli, "serve", "--listen", "127.0.0.1:0", "--sqlite-path", str(db), env={"LLMGW_POSTGRES_DSN": dsn}
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "LLMGW_POSTGRES_DSN holds 1 active gateway keys and 0 BYOK providers" in done.stderr
    assert "set LLMGW_KEY_STORE=postgres" in done.stderr
    assert "serving on" not in done.stderr
    assert postgres_server.password not in done.stderr


async def test_a_dsn_that_cannot_be_checked_with_an_empty_sqlite_store_refuses_until_the_operator_chooses(
    tmp_path: Path,
) -> None:
    """Postgres down at the first start after the upgrade: the server cannot tell "keys were
    there" from a fresh install, and an empty store on loopback would turn auth off."""
    dsn = f"postgresql://gw:{PASSWORD}@127.0.0.1:{free_port()}/gone"
    db = tmp_path / "gateway.db"
    args = ("serve", "--listen", "127.0.0.1:0", "--sqlite-path", str(db))
    done = await asyncio.to_thread(run_cli, *args, env={"LLMGW_POSTGRES_DSN": dsn})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot check LLMGW_POSTGRES_DSN for gateway keys of an older version" in done.stderr
    assert "Set LLMGW_KEY_STORE=sqlite or LLMGW_KEY_STORE=postgres" in done.stderr
    assert PASSWORD not in done.stderr
    # The operator's explicit choice skips the check: it serves (traces in SQLite only).
    env = {"LLMGW_POSTGRES_DSN": dsn, "LLMGW_KEY_STORE": "sqlite"}
    with server_process(tmp_path, env=env, sqlite_path=db) as server:
        pass
    assert "cannot check" not in server.log and PASSWORD not in server.log


async def test_the_postgres_key_store_serves_those_keys_and_the_log_says_where_things_live(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    async with PostgresAuthStore(dsn=dsn) as store:
        _, key = await store.create_key(organization_id="acme")
    env = {"LLMGW_POSTGRES_DSN": dsn, "LLMGW_KEY_STORE": "postgres", "LLMGW_AUTH": "required"}
    # Relative to the server's working directory (the repository), landing in tmp_path.
    relative = os.path.relpath(tmp_path / "gateway.db", REPO_ROOT)
    with server_process(tmp_path, env=env, sqlite_path=Path(relative)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            from llmgateway.v1 import traces_pb2, traces_pb2_grpc

            stub = traces_pb2_grpc.ProviderTraceServiceStub(channel)
            # Authenticated by the Postgres store: an empty list, not UNAUTHENTICATED.
            await stub.ListProviderTraces(
                traces_pb2.ListProviderTracesRequest(),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=10,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListProviderTraces(traces_pb2.ListProviderTracesRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        log = server.log
    where = f"127.0.0.1:{postgres_server.port}"
    assert f"keys and BYOK providers in postgres postgresql://postgres:***@{where}/" in log, log[-3000:]
    # The relative path was resolved once, against the server's working directory, and logged so.
    assert not relative.startswith("/")
    assert f"traces in sqlite {tmp_path / 'gateway.db'}" in log, log[-3000:]
    assert postgres_server.password not in log


async def test_keys_in_both_stores_start_with_a_warning_and_keys_commands_say_which_store(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    async with PostgresAuthStore(dsn=dsn) as old:
        await old.create_key(organization_id="acme")
    db = tmp_path / "gateway.db"
    env = {"LLMGW_POSTGRES_DSN": dsn}
    # The operator decided to keep keys in SQLite: `keys create` says where, and warns.
    made = await asyncio.to_thread(
        run_cli, "keys", "create", "--org", "acme", "--sqlite-path", str(db), env=env
    )
    assert made.returncode == 0, made.stderr
    assert f"key store: sqlite {db}" in made.stderr
    assert "warning: LLMGW_POSTGRES_DSN holds 1 active gateway keys" in made.stderr
    assert made.stdout.splitlines()[-1].startswith("llmgw_")  # stdout stays as it was
    listed = await asyncio.to_thread(
        run_cli, "keys", "list", "--sqlite-path", str(db), "--key-store", "postgres", env=env
    )
    assert listed.returncode == 0 and "key store: postgres postgresql://postgres:***@" in listed.stderr
    assert postgres_server.password not in listed.stderr + listed.stdout
    assert len(listed.stdout.splitlines()) == 2  # the header and the Postgres key
    # SQLite is not empty now: the server starts, and warns.
    with server_process(tmp_path, env=env, sqlite_path=db) as server:
        pass
    assert "LLMGW_POSTGRES_DSN holds 1 active gateway keys" in server.log
    assert "keys and BYOK providers in sqlite" in server.log


class Relay:
    """A TCP relay on a fixed loopback port in front of a real server; `cut()` makes the server
    unreachable (listener and connections closed), `restore()` brings it back on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()
        self._writers.clear()


async def wait_health(channel: grpc.aio.Channel, status: int, timeout: float = 30) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout
    seen = None
    while time.monotonic() < end:
        seen = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
        if seen == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health stayed {seen}, expected {status}")


async def test_health_is_not_serving_while_the_key_store_is_unreachable(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    relay = Relay(postgres_server.port)
    await relay.restore()
    dsn = (await fresh_postgres_database(postgres_server)).replace(
        f":{postgres_server.port}/", f":{relay.port}/"
    )
    async with PostgresAuthStore(dsn=dsn) as store:
        await store.create_key(organization_id="acme")
    settings = make_settings(tmp_path, auth="required", key_store="postgres", postgres_dsn=dsn)
    outages = COUNTERS.key_store_outages
    try:
        async with running_gateway(settings) as gw:
            await wait_health(gw.channel, SERVING)
            await relay.cut()
            await wait_health(gw.channel, NOT_SERVING)
            assert COUNTERS.key_store_outages == outages + 1
            await relay.restore()
            await wait_health(gw.channel, SERVING)
    finally:
        await relay.cut()


async def test_a_trace_backend_that_is_down_is_a_warning_and_a_count_not_an_outage(
    tmp_path: Path, postgres_server: PostgresServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(postgres_server.port)
    await relay.restore()
    dsn = (await fresh_postgres_database(postgres_server)).replace(
        f":{postgres_server.port}/", f":{relay.port}/"
    )
    settings = make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("sqlite", "postgres"),
        postgres_dsn=dsn,
        auth="off",
    )
    before = COUNTERS.trace_backend_outages.get("postgres", 0)
    try:
        async with running_gateway(settings) as gw:
            await relay.cut()
            await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
            end = time.monotonic() + 30
            while COUNTERS.trace_backend_outages.get("postgres", 0) == before and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert COUNTERS.trace_backend_outages.get("postgres", 0) == before + 1
            stub = health_pb2_grpc.HealthStub(gw.channel)
            assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING
            # Calls go on.
            await gw.chat.Create(chat_request(upstream.base_url), timeout=10)
            await wait_for_count(gw.traces, 2)  # the calls' traces reached SQLite
            await relay.restore()
    finally:
        await relay.cut()
    assert "trace backend postgres is failing" in caplog.text
