"""Issue 6 end to end, through the real server: gateway keys, the actor, BYOK, endpoints,
redaction (a canary run) and TLS / mutual TLS.

In-process servers come from `tests.gateway_harness.running_gateway`; the CLI, "refuses to start"
and the OpenTelemetry console run use real subprocesses (`python -m server ...`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from llmgateway.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)

from server.app import GatewayServer
from server.auth.store_sqlite import SqliteAuthStore
from server.config import Settings
from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.process_harness import REPO_ROOT, clean_env
from tests.tls_certs import CertFiles, make_certs

CHAT = "llmgateway.v1.ChatCompletionService"
TRACES = "llmgateway.v1.ProviderTraceService"
PROVIDERS = "llmgateway.v1.ProviderService"
USER = chat_pb2.ROLE_USER
PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")


# --- helpers ---------------------------------------------------------------------------------


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def make_key(db: Path, org: str, *, admin: bool = False, user: str = "") -> tuple[str, str]:
    """(key_id, key) created straight in the store (tests that are not about the CLI)."""
    async with SqliteAuthStore(path=str(db)) as store:
        return await store.create_key(organization_id=org, user_id=user, is_admin=admin)


async def revoke(db: Path, key_id: str) -> None:
    async with SqliteAuthStore(path=str(db)) as store:
        assert await store.revoke_key(key_id=key_id)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    raise AssertionError(f"no ErrorInfo in the trailers of {error.code()} {error.details()!r}")


def error_texts(error: grpc.aio.AioRpcError) -> list[str]:
    """Everything a caller can read from a failed call: message, metadata, decoded details."""
    texts = [str(error.details()), str(error.debug_error_string())]
    for metadata in (error.initial_metadata() or (), error.trailing_metadata() or ()):
        for key, value in metadata:
            if isinstance(value, bytes):
                texts.append(value.decode("latin-1"))
                if key == "grpc-status-details-bin":
                    status = status_pb2.Status.FromString(value)
                    texts.append(str(status))
                    for detail in status.details:
                        for kind in (
                            error_details_pb2.ErrorInfo,
                            error_details_pb2.BadRequest,
                            error_details_pb2.RetryInfo,
                        ):
                            if detail.Is(kind.DESCRIPTOR):
                                message = kind()
                                detail.Unpack(message)
                                texts.append(json_format.MessageToJson(message))
            else:
                texts.append(f"{key}: {value}")
    return texts


async def expect_error(awaitable: Any) -> grpc.aio.AioRpcError:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded; an error status was expected")


async def expect_stream_error(call: Any) -> grpc.aio.AioRpcError:
    async def drain() -> None:
        async for _ in call:
            pass

    return await expect_error(drain())


async def wait_trace(
    traces: traces_pb2_grpc.ProviderTraceServiceStub, step_id: str, metadata: Any = None, timeout: float = 5.0
) -> traces_pb2.ProviderTrace:
    """The trace of a step, once the asynchronous trace writer has stored it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = await traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=step_id), metadata=metadata, timeout=5
            )
            return response.trace
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def llmgateway_methods() -> list[tuple[str, bool]]:
    """(full method path, server_streaming) of every RPC of every llmgateway.v1 service."""
    methods = []
    for module in (chat_pb2, traces_pb2, providers_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods.append((f"/{service.full_name}/{method.name}", method.server_streaming))
    return methods


async def raw_call(
    channel: grpc.aio.Channel, path: str, streaming: bool, data: bytes, metadata: Any
) -> grpc.aio.AioRpcError | None:
    """Call a method with raw request bytes; the error, or None when it succeeded."""
    try:
        if streaming:
            async for _ in channel.unary_stream(path)(data, metadata=metadata, timeout=10):
                pass
        else:
            await channel.unary_unary(path)(data, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def reflection_services(channel: grpc.aio.Channel, version: str = "v1alpha") -> list[str]:
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names: list[str] = []
    async for response in call:
        names += [s.name for s in response.list_services_response.service]
    return names


def db_bytes(directory: Path) -> bytes:
    """Every byte of the SQLite database (main file, WAL and shared memory)."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("gateway.db*")) if p.is_file())


class ByteSink:
    """A raw TCP listener that counts connections and bytes (to prove no byte left the gateway)."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            data = await asyncio.wait_for(reader.read(65536), 2)
            self.received += len(data)
        except TimeoutError:
            pass
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@asynccontextmanager
async def upstreams(count: int) -> AsyncIterator[list[FakeUpstream]]:
    fakes = [FakeUpstream() for _ in range(count)]
    for fake in fakes:
        await fake.start()
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


def root_url(upstream: FakeUpstream) -> str:
    return f"http://127.0.0.1:{upstream.port}"


# --- subprocesses ----------------------------------------------------------------------------


def run_cli(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m server keys --sqlite-path DB <args>` (the store flags belong to `keys`)."""
    return subprocess.run(
        [sys.executable, "-m", "server", "keys", "--sqlite-path", str(db), *args],
        cwd=REPO_ROOT,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclasses.dataclass
class Spawned:
    """A `python -m server serve` subprocess whose stdout and stderr are both kept."""

    process: subprocess.Popen[str]
    out: list[str] = dataclasses.field(default_factory=list)
    err: list[str] = dataclasses.field(default_factory=list)
    port: int = 0
    port_found: threading.Event = dataclasses.field(default_factory=threading.Event)
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def _read(self, stream: Any, sink: list[str], find_port: bool) -> None:
        for line in stream:
            sink.append(line)
            match = PORT_LINE.search(line) if find_port else None
            if match and not self.port_found.is_set():
                self.port = int(match.group(1))
                self.port_found.set()
        if find_port:
            self.port_found.set()

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code


def spawn(args: Sequence[str], env: dict[str, str] | None = None) -> Spawned:
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", *args],
        cwd=REPO_ROOT,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    spawned = Spawned(process)
    for stream, sink, find_port in (
        (process.stdout, spawned.out, False),
        (process.stderr, spawned.err, True),
    ):
        thread = threading.Thread(target=spawned._read, args=(stream, sink, find_port), daemon=True)
        thread.start()
        spawned.threads.append(thread)
    return spawned


@asynccontextmanager
async def spawned_server(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    target_host: str = "127.0.0.1",
) -> AsyncIterator[Spawned]:
    """Start a server subprocess, wait until it answers health checks, SIGTERM it at the end."""
    spawned = spawn(args, env)
    try:
        found = await asyncio.to_thread(spawned.port_found.wait, 30)
        if not found or not spawned.port:
            raise AssertionError(f"server did not start (exit {spawned.process.poll()}):\n{spawned.stderr}")
        deadline = time.monotonic() + 30
        while True:
            try:
                async with open_channel(f"{target_host}:{spawned.port}", credentials) as channel:
                    response = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if spawned.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never became healthy:\n{spawned.stderr}")
            await asyncio.sleep(0.1)
        yield spawned
    finally:
        code = await asyncio.to_thread(spawned.stop)
        assert code == 0, f"server exited {code}:\n{spawned.stderr}"


@asynccontextmanager
async def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    try:
        yield channel
    finally:
        await channel.close()


# =============================================================================================
# 1. Gateway keys
# =============================================================================================


async def test_cli_keys_create_list_revoke_against_running_server(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    db = tmp_path / "gateway.db"
    created = await asyncio.to_thread(run_cli, db, "create", "--org", "acme", "--admin", "--user", "alice")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    key = lines[-1]
    assert re.fullmatch(r"llmgw_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}", key), lines
    key_id = key.split("_")[1]
    assert key not in "\n".join(lines[:-1])  # alone on its last line, shown once

    plain = await asyncio.to_thread(run_cli, db, "create", "--org", "acme")
    assert plain.returncode == 0, plain.stderr
    plain_key = plain.stdout.strip().splitlines()[-1]

    listing = await asyncio.to_thread(run_cli, db, "list")
    assert listing.returncode == 0, listing.stderr
    assert key_id in listing.stdout and "acme" in listing.stdout and "alice" in listing.stdout
    secret = key.split("_", 2)[2]
    for hidden in (
        key,
        secret,
        plain_key,
        plain_key.split("_", 2)[2],
        hashlib.sha256(key.encode()).hexdigest(),
    ):
        assert hidden not in listing.stdout
        assert hidden not in listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(key_id))
    assert "\tyes\t" in row  # admin

    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        # The key works, for chat and for admin-only calls.
        await gw.chat.CountTokens(chat_request(upstream.base_url), metadata=bearer(key), timeout=10)
        await gw.providers.ListProviders(
            providers_pb2.ListProvidersRequest(), metadata=bearer(key), timeout=10
        )
        response = await gw.chat.Create(chat_request(upstream.base_url), metadata=bearer(key), timeout=10)
        assert response.completion.choices[0].message.content == "Hello!"

        revoked = await asyncio.to_thread(run_cli, db, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        while True:
            error: grpc.aio.AioRpcError | None = None
            try:
                await gw.chat.CountTokens(chat_request(upstream.base_url), metadata=bearer(key), timeout=10)
            except grpc.aio.AioRpcError as exc:
                error = exc
            if error is not None:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
                break
            assert time.monotonic() - started < 6.5, "revoked key still accepted after the cache TTL"
            await asyncio.sleep(0.2)
        # Other keys are unaffected; revoking again reports that no active key has that id.
        await gw.chat.CountTokens(chat_request(upstream.base_url), metadata=bearer(plain_key), timeout=10)
        again = await asyncio.to_thread(run_cli, db, "revoke", key_id)
        assert again.returncode != 0

    listing = await asyncio.to_thread(run_cli, db, "list")
    row = next(line for line in listing.stdout.splitlines() if line.startswith(key_id))
    assert not row.endswith("\t-"), row  # the revocation time is shown


async def test_every_rpc_needs_a_valid_key_except_health_and_reflection(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    db = tmp_path / "gateway.db"
    key_id, key = await make_key(db, "acme", admin=True)
    revoked_id, revoked_key = await make_key(db, "acme", admin=True)
    await revoke(db, revoked_id)
    other_id = secrets.token_hex(8)
    bad_keys: dict[str, Any] = {
        "missing": None,
        "empty metadata": (("authorization", ""),),
        "no scheme": (("authorization", key),),
        "basic scheme": (("authorization", f"Basic {key}"),),
        "bearer without token": (("authorization", "Bearer "),),
        "malformed": bearer("not-a-gateway-key"),
        "malformed prefix": bearer(f"llmgw_{key_id}"),
        "wrong secret": bearer(f"llmgw_{key_id}_{secrets.token_urlsafe(32)}"),
        "unknown id": bearer(f"llmgw_{other_id}_{key.split('_', 2)[2]}"),
        "revoked": bearer(revoked_key),
        "other header": (("x-api-key", key),),
    }
    requests: dict[str, bytes] = {
        f"/{CHAT}/Create": chat_request(upstream.base_url).SerializeToString(),
        f"/{CHAT}/StreamCreate": chat_request(upstream.base_url).SerializeToString(),
        f"/{CHAT}/CountTokens": chat_request(upstream.base_url).SerializeToString(),
        f"/{TRACES}/GetProviderTrace": traces_pb2.GetProviderTraceRequest(step_id="s").SerializeToString(),
        f"/{PROVIDERS}/CreateProvider": providers_pb2.CreateProviderRequest(
            name="p", model_endpoint_type="openai", base_url=upstream.base_url, api_key="sk-test-123456789012"
        ).SerializeToString(),
        f"/{PROVIDERS}/DeleteProvider": providers_pb2.DeleteProviderRequest(name="p").SerializeToString(),
    }
    methods = llmgateway_methods()
    assert len(methods) >= 8

    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        for path, streaming in methods:
            for label, metadata in bad_keys.items():
                for data in (requests.get(path, b""), b""):
                    error = await raw_call(gw.channel, path, streaming, data, metadata)
                    assert error is not None, f"{path} accepted a {label} key"
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (path, label, error.details())
                    assert error_info(error).reason == "UNAUTHENTICATED"
                    assert key.split("_", 2)[2] not in " ".join(error_texts(error))
        assert upstream.requests == []  # nothing reached the upstream
        assert (
            await gw.traces.ListProviderTraces(
                traces_pb2.ListProviderTracesRequest(), metadata=bearer(key), timeout=10
            )
            == traces_pb2.ListProviderTracesResponse()
        )

        # Health and reflection (both versions) need no key.
        health = health_pb2_grpc.HealthStub(gw.channel)
        for service in ("", CHAT, TRACES, PROVIDERS):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        for version in ("v1alpha", "v1"):
            names = await reflection_services(gw.channel, version)
            assert {CHAT, TRACES, PROVIDERS} <= set(names), (version, names)

        # And the valid key works on every service.
        for path, streaming in methods:
            error = await raw_call(gw.channel, path, streaming, requests.get(path, b""), bearer(key))
            assert error is None or error.code() != grpc.StatusCode.UNAUTHENTICATED, (path, error.details())


def test_auto_on_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--sqlite-path",
            str(tmp_path / "gateway.db"),
        ],
        cwd=REPO_ROOT,
        env=clean_env({"LLMGW_AUTH": "auto"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(
            "the server reported that it cannot start but did not exit within 30 s (something it "
            f"started, e.g. the auth store's SQLite thread, was never closed):\n{stderr}"
        ) from None
    assert process.returncode != 0, stderr
    assert "serving on" not in stderr
    assert "LLMGW_AUTH" in stderr and "keys create" in stderr, stderr
    assert "LLMGW_AUTH=off" in stderr  # says how to run without keys on purpose


async def test_auth_off_explicit_on_non_loopback_starts_with_a_warning(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    args = [
        "--listen",
        "0.0.0.0:0",
        "--sqlite-path",
        str(tmp_path / "gateway.db"),
        "--allowed-endpoints",
        upstream.base_url,
    ]
    async with spawned_server(args, {"LLMGW_AUTH": "off"}) as server:
        assert re.search(r"WARNING .*LLMGW_AUTH=off while listening on 0\.0\.0\.0", server.stderr), (
            server.stderr
        )
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            response = await chat.Create(chat_request(upstream.base_url), timeout=10)
            assert response.completion.choices[0].message.content == "Hello!"


async def test_auto_on_loopback_is_off_with_a_warning(tmp_path: Path, upstream: FakeUpstream) -> None:
    args = [
        "--listen",
        "127.0.0.1:0",
        "--sqlite-path",
        str(tmp_path / "gateway.db"),
        "--allowed-endpoints",
        upstream.base_url,
    ]
    async with spawned_server(args, {"LLMGW_AUTH": "auto"}) as server:
        assert re.search(r"WARNING .*authentication is OFF", server.stderr), server.stderr
        assert "auth off" in server.stderr
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            await chat.CountTokens(chat_request(upstream.base_url), timeout=10)


async def test_auto_on_non_loopback_with_keys_requires_them(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "gateway.db"
    _, key = await make_key(db, "acme")
    args = ["--listen", "0.0.0.0:0", "--sqlite-path", str(db), "--allowed-endpoints", upstream.base_url]
    async with spawned_server(args, {"LLMGW_AUTH": "auto"}) as server:
        assert "auth required" in server.stderr
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            error = await expect_error(chat.CountTokens(chat_request(upstream.base_url), timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            await chat.CountTokens(chat_request(upstream.base_url), metadata=bearer(key), timeout=10)


# =============================================================================================
# 2. The actor
# =============================================================================================


async def test_traces_are_scoped_to_the_keys_organization(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "gateway.db"
    _, key_a = await make_key(db, "org-a", user="alice")
    _, key_b = await make_key(db, "org-b", admin=True)
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        request = chat_request(
            upstream.base_url, trace=chat_pb2.TraceContext(step_id="step-a", run_id="run-a")
        )
        response = await gw.chat.Create(request, metadata=bearer(key_a), timeout=10)
        trace = await wait_trace(gw.traces, "step-a", bearer(key_a))
        assert trace.id == response.provider_trace_id
        assert trace.organization_id == "org-a"
        assert trace.user_id == "alice"

        error = await expect_error(
            gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id="step-a"), metadata=bearer(key_b), timeout=10
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND

        own = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(), metadata=bearer(key_a), timeout=10
        )
        assert [t.id for t in own.traces] == [trace.id]
        for request_b in (
            traces_pb2.ListProviderTracesRequest(),
            traces_pb2.ListProviderTracesRequest(step_id="step-a"),
            traces_pb2.ListProviderTracesRequest(run_id="run-a"),
        ):
            other = await gw.traces.ListProviderTraces(request_b, metadata=bearer(key_b), timeout=10)
            assert list(other.traces) == []

        # Org B's own call shows up for B only.
        await gw.chat.Create(
            chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id="step-b")),
            metadata=bearer(key_b),
            timeout=10,
        )
        trace_b = await wait_trace(gw.traces, "step-b", bearer(key_b))
        assert trace_b.organization_id == "org-b"
        own = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(), metadata=bearer(key_a), timeout=10
        )
        assert [t.id for t in own.traces] == [trace.id]
        await expect_error(
            gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id="step-b"), metadata=bearer(key_a), timeout=10
            )
        )


async def test_provider_service_needs_an_admin_key(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "gateway.db"
    _, user_key = await make_key(db, "acme", user="bob")
    _, admin_key = await make_key(db, "acme", admin=True)
    settings = make_settings(
        tmp_path, auth="required", allowed_endpoints=(upstream.base_url,), encryption_key="enc-passphrase-1"
    )
    create = providers_pb2.CreateProviderRequest(
        name="mine",
        model_endpoint_type="openai",
        base_url=upstream.base_url,
        api_key="sk-user-0123456789abcd",
    )
    async with running_gateway(settings) as gw:
        for call in (
            gw.providers.CreateProvider(create, metadata=bearer(user_key), timeout=10),
            gw.providers.ListProviders(
                providers_pb2.ListProvidersRequest(), metadata=bearer(user_key), timeout=10
            ),
            gw.providers.DeleteProvider(
                providers_pb2.DeleteProviderRequest(name="mine"), metadata=bearer(user_key), timeout=10
            ),
        ):
            error = await expect_error(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            assert error_info(error).reason == "PERMISSION_DENIED"
        listed = await gw.providers.ListProviders(
            providers_pb2.ListProvidersRequest(), metadata=bearer(admin_key), timeout=10
        )
        assert list(listed.providers) == []  # the refused create stored nothing
        await gw.providers.CreateProvider(create, metadata=bearer(admin_key), timeout=10)


# =============================================================================================
# 3. BYOK
# =============================================================================================


async def test_byok_providers_encrypted_listed_used_and_deleted(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    _, admin_a = await make_key(db, "org-a", admin=True)
    _, user_a = await make_key(db, "org-a")
    _, admin_b = await make_key(db, "org-b", admin=True)
    byok_key = "byok-" + secrets.token_hex(20) + "WXYZ"
    async with upstreams(2) as (byok_up, other):
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="passphrase-" + secrets.token_hex(8),
            allowed_endpoints=(byok_up.base_url, other.base_url),
        )
        async with running_gateway(settings) as gw:
            created = await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="mine",
                    model_endpoint_type="openai",
                    base_url=byok_up.base_url + "/",
                    api_key=byok_key,
                ),
                metadata=bearer(admin_a),
                timeout=10,
            )
            provider = created.provider
            assert provider.name == "mine" and provider.organization_id == "org-a"
            assert provider.api_key_last4 == "WXYZ"
            assert byok_key not in str(created) and byok_key[:-4] not in created.SerializeToString().decode(
                "latin-1"
            )

            listed = await gw.providers.ListProviders(
                providers_pb2.ListProvidersRequest(), metadata=bearer(admin_a), timeout=10
            )
            assert [p.name for p in listed.providers] == ["mine"]
            raw = listed.SerializeToString()
            assert byok_key.encode() not in raw and byok_key[:-4].encode() not in raw
            assert listed.providers[0].api_key_last4 == "WXYZ"
            # Another organization sees nothing of it.
            listed_b = await gw.providers.ListProviders(
                providers_pb2.ListProvidersRequest(), metadata=bearer(admin_b), timeout=10
            )
            assert list(listed_b.providers) == []

            # Duplicate name: ALREADY_EXISTS, key not echoed.
            error = await expect_error(
                gw.providers.CreateProvider(
                    providers_pb2.CreateProviderRequest(
                        name="mine", model_endpoint_type="openai", base_url=byok_up.base_url, api_key=byok_key
                    ),
                    metadata=bearer(admin_a),
                    timeout=10,
                )
            )
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert byok_key not in " ".join(error_texts(error))

            # A non-admin of the organization may *use* the provider.
            byok_config = chat_pb2.LLMConfig(
                model="gpt-4o-mini",
                model_endpoint_type="openai",
                provider_name="mine",
                provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
                context_window=128000,
            )
            response = await gw.chat.Create(
                chat_request("", llm_config=byok_config, trace=chat_pb2.TraceContext(step_id="byok-step")),
                metadata=bearer(user_a),
                timeout=10,
            )
            assert response.completion.choices[0].message.content == "Hello!"
            assert len(byok_up.requests) == 1
            assert byok_up.requests[0].path == "/v1/chat/completions"
            assert byok_up.requests[0].headers["Authorization"] == f"Bearer {byok_key}"
            trace = await wait_trace(gw.traces, "byok-step", bearer(user_a))
            assert trace.is_byok
            assert byok_key not in json_format.MessageToJson(trace)

            # Streaming too.
            byok_up.script(Reply(sse=text_stream(["Hi", "!"])))
            stream = gw.chat.StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(
                    chat_request("", llm_config=byok_config).SerializeToString()
                ),
                metadata=bearer(user_a),
                timeout=10,
            )
            events = [event async for event in stream]
            assert events[-1].completion.choices[0].message.content == "Hi!"
            assert byok_up.requests[-1].headers["Authorization"] == f"Bearer {byok_key}"

            # The key goes only to its own base URL, even when the endpoint asked for is allowed.
            other_config = chat_pb2.LLMConfig()
            other_config.CopyFrom(byok_config)
            other_config.model_endpoint = other.base_url
            error = await expect_error(
                gw.chat.Create(chat_request("", llm_config=other_config), metadata=bearer(user_a), timeout=10)
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"
            assert other.requests == []

            # Organization B has no provider of that name.
            error = await expect_error(
                gw.chat.Create(chat_request("", llm_config=byok_config), metadata=bearer(admin_b), timeout=10)
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert len(byok_up.requests) == 2

            # Delete (B cannot delete A's), then the provider is gone.
            error = await expect_error(
                gw.providers.DeleteProvider(
                    providers_pb2.DeleteProviderRequest(name="mine"), metadata=bearer(admin_b), timeout=10
                )
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            await gw.providers.DeleteProvider(
                providers_pb2.DeleteProviderRequest(name="mine"), metadata=bearer(admin_a), timeout=10
            )
            listed = await gw.providers.ListProviders(
                providers_pb2.ListProvidersRequest(), metadata=bearer(admin_a), timeout=10
            )
            assert list(listed.providers) == []
            error = await expect_error(
                gw.chat.Create(chat_request("", llm_config=byok_config), metadata=bearer(user_a), timeout=10)
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert len(byok_up.requests) == 2

        data = db_bytes(tmp_path)
        assert b"CREATE TABLE providers" in data or b"providers" in data
        for needle in (byok_key, byok_key[:-4], settings.encryption_key):
            assert needle.encode() not in data, f"{needle!r} is in the database file"


async def test_byok_is_stored_encrypted_at_rest(tmp_path: Path) -> None:
    """Before deletion: the row exists, its key is ciphertext, and the plaintext is in no file byte."""
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    byok_key = "plaintext-byok-" + secrets.token_hex(16)
    async with upstreams(1) as (byok_up,):
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="pass-" + secrets.token_hex(8),
            allowed_endpoints=(byok_up.base_url,),
        )
        async with running_gateway(settings) as gw:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="mine", model_endpoint_type="openai", base_url=byok_up.base_url, api_key=byok_key
                ),
                metadata=bearer(admin),
                timeout=10,
            )
            assert byok_key.encode() not in db_bytes(tmp_path)
        assert byok_key.encode() not in db_bytes(tmp_path)
        async with SqliteAuthStore(path=str(db)) as store:
            (record,) = await store.list_providers(organization_id="org-a")
        assert record.api_key_encrypted and byok_key not in record.api_key_encrypted
        from server.auth.byok import binding_of
        from server.auth.crypto import Keyring

        assert (
            Keyring(settings.encryption_key).decrypt(record.api_key_encrypted, binding_of(record)) == byok_key
        )


async def test_byok_without_encryption_key_fails_with_the_reason(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        error = await expect_error(
            gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="mine",
                    model_endpoint_type="openai",
                    base_url=upstream.base_url,
                    api_key="sk-never-stored-0123456789",
                ),
                metadata=bearer(admin),
                timeout=10,
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "LLMGW_ENCRYPTION_KEY" in (error.details() or "")
        info = error_info(error)
        assert info.metadata["setting"] == "LLMGW_ENCRYPTION_KEY"
        listed = await gw.providers.ListProviders(
            providers_pb2.ListProvidersRequest(), metadata=bearer(admin), timeout=10
        )
        assert list(listed.providers) == []
    assert b"sk-never-stored-0123456789" not in db_bytes(tmp_path)


# =============================================================================================
# 4. Endpoints
# =============================================================================================


async def test_endpoint_not_allowed_sends_no_byte(tmp_path: Path, upstream: FakeUpstream) -> None:
    sink = ByteSink()
    await sink.start()
    try:
        settings = make_settings(
            tmp_path, allowed_endpoints=(upstream.base_url,), openai_api_key="sk-server-held-0123456789"
        )
        async with running_gateway(settings) as gw:
            for endpoint in (
                sink.base_url,
                f"http://127.0.0.1:{sink.port}/v1/",
                f"http://localhost:{sink.port}/v1",
                f"http://127.0.0.1:{upstream.port}/v10",  # a prefix of the allowed path is not under it
                f"http://127.0.0.1:{upstream.port}/v1/../x",
                f"http://127.0.0.1:{upstream.port}@127.0.0.1:{sink.port}/v1",
                f"https://127.0.0.1:{upstream.port}/v1",
            ):
                for error in (
                    await expect_error(gw.chat.Create(chat_request(endpoint), timeout=10)),
                    await expect_stream_error(gw.chat.StreamCreate(chat_request(endpoint), timeout=10)),
                ):
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (endpoint, error.details())
                    assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"
            # Local-server types go through the same policy.
            local = chat_pb2.LLMConfig(
                model="m",
                model_endpoint_type="vllm",
                model_endpoint=f"http://127.0.0.1:{sink.port}",
                context_window=8000,
            )
            error = await expect_error(gw.chat.Create(chat_request("", llm_config=local), timeout=10))
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"
            await asyncio.sleep(0.2)
        assert (sink.connections, sink.received) == (0, 0)
        assert upstream.requests == []
    finally:
        await sink.stop()


FORBIDDEN_ENDPOINTS = (
    "http://169.254.169.254/v1",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/v1",
    "http://[fe80::1]:8080/v1",
    "http://2852039166/v1",  # 169.254.169.254 as one decimal number
    "http://0xa9fea9fe/v1",  # ... as hex
    "http://0251.0376.0251.0376/v1",  # ... as octal parts
    "http://169.254.43518/v1",  # ... as a.b.c (16-bit tail)
    "http://[::ffff:169.254.169.254]/v1",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/v1",
    "http://metadata.google.internal/computeMetadata/v1",
    "http://100.100.100.200/v1",  # Alibaba metadata
)


async def test_link_local_and_metadata_refused_even_when_listed(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    settings = make_settings(
        tmp_path,
        auth="required",
        allowed_endpoints=FORBIDDEN_ENDPOINTS,
        encryption_key="pass-0123456789",
        openai_api_key="sk-server-held-0123456789",
    )
    async with running_gateway(settings) as gw:
        for endpoint in FORBIDDEN_ENDPOINTS:
            error = await expect_error(
                gw.chat.Create(chat_request(endpoint), metadata=bearer(admin), timeout=10)
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (endpoint, error.details())
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"
            error = await expect_stream_error(
                gw.chat.StreamCreate(chat_request(endpoint), metadata=bearer(admin), timeout=10)
            )
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED", endpoint
            local = chat_pb2.LLMConfig(
                model="m",
                model_endpoint_type="vllm",
                model_endpoint=endpoint.rsplit("/v1", 1)[0] or endpoint,
                context_window=8000,
            )
            error = await expect_error(
                gw.chat.Create(chat_request("", llm_config=local), metadata=bearer(admin), timeout=10)
            )
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED", endpoint
            # Nor can a tenant register one as its BYOK base URL.
            error = await expect_error(
                gw.providers.CreateProvider(
                    providers_pb2.CreateProviderRequest(
                        name="meta",
                        model_endpoint_type="openai",
                        base_url=endpoint,
                        api_key="k-0123456789abcdef",
                    ),
                    metadata=bearer(admin),
                    timeout=10,
                )
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (endpoint, error.details())
            assert error_info(error).reason == "ENDPOINT_NOT_ALLOWED"


async def test_redirects_are_not_followed(tmp_path: Path) -> None:
    async with upstreams(2) as (first, second):
        settings = make_settings(tmp_path, allowed_endpoints=(first.base_url, second.base_url))
        async with running_gateway(settings) as gw:
            for status in (301, 302, 303, 307, 308):
                location = {"Location": second.base_url + "/chat/completions"}
                first.script(Reply(status=status, json_body={}, headers=location))
                error = await expect_error(gw.chat.Create(chat_request(first.base_url), timeout=10))
                assert error.code() != grpc.StatusCode.OK
                first.script(Reply(status=status, json_body={}, headers=location))
                error = await expect_stream_error(
                    gw.chat.StreamCreate(chat_request(first.base_url), timeout=10)
                )
                assert error.code() != grpc.StatusCode.OK
            assert len(first.requests) == 10
            assert second.requests == []


async def test_server_held_keys_go_only_to_their_base_url(tmp_path: Path) -> None:
    openai_key = "openai-server-" + secrets.token_hex(12)
    openrouter_key = "openrouter-server-" + secrets.token_hex(12)
    local_key = "local-server-" + secrets.token_hex(12)
    async with upstreams(4) as (openai_up, openrouter_up, local_up, other):
        settings = make_settings(
            tmp_path,
            openai_api_key=openai_key,
            openai_base_url=openai_up.base_url,
            openrouter_api_key=openrouter_key,
            openrouter_base_url=openrouter_up.base_url,
            local_auth_type="bearer_token",
            local_base_url=root_url(local_up),
            local_api_key=local_key,
            allowed_endpoints=(other.base_url, root_url(other), root_url(local_up)),
        )
        async with running_gateway(settings) as gw:
            # Each key reaches its own base URL ...
            await gw.chat.Create(chat_request(openai_up.base_url), timeout=10)
            await gw.chat.Create(chat_request(""), timeout=10)  # no endpoint: the configured OpenAI one
            assert [r.headers["Authorization"] for r in openai_up.requests] == [f"Bearer {openai_key}"] * 2
            openrouter_cfg = chat_pb2.LLMConfig(
                model="openai/gpt-4o-mini",
                model_endpoint_type="openai",
                model_endpoint=openrouter_up.base_url,
                provider_name="openrouter",
                context_window=128000,
            )
            await gw.chat.Create(chat_request("", llm_config=openrouter_cfg), timeout=10)
            assert openrouter_up.requests[-1].headers["Authorization"] == f"Bearer {openrouter_key}"
            local_up.default = Reply(
                json_body={
                    "choices": [{"text": "hi", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                }
            )
            local_cfg = chat_pb2.LLMConfig(
                model="m", model_endpoint_type="vllm", model_endpoint=root_url(local_up), context_window=8000
            )
            await gw.chat.Create(chat_request("", llm_config=local_cfg), timeout=10)
            assert local_up.requests[-1].headers["Authorization"] == f"Bearer {local_key}"

            # ... and never another allowed endpoint, whatever the request says.
            other_local = chat_pb2.LLMConfig()
            other_local.CopyFrom(local_cfg)
            other_local.model_endpoint = root_url(other)
            other_openrouter = chat_pb2.LLMConfig()
            other_openrouter.CopyFrom(openrouter_cfg)
            other_openrouter.model_endpoint = other.base_url
            other_openai_named = chat_pb2.LLMConfig(
                model="gpt-4o-mini",
                model_endpoint_type="openai",
                model_endpoint=other.base_url,
                provider_name="openai",
                context_window=128000,
            )
            for request in (
                chat_request(other.base_url),
                chat_request("", llm_config=other_openrouter),
                chat_request("", llm_config=other_openai_named),
            ):
                await gw.chat.Create(request, timeout=10)
            other.script(Reply(sse=text_stream(["a"])))
            stream = gw.chat.StreamCreate(chat_request(other.base_url), timeout=10)
            async for _ in stream:
                pass
            other.script(Reply(json_body=local_up.default.json_body))
            await gw.chat.Create(chat_request("", llm_config=other_local), timeout=10)
            assert len(other.requests) == 5
            for recorded in other.requests:
                headers = " ".join(f"{k}: {v}" for k, v in recorded.headers.items())
                for key in (openai_key, openrouter_key, local_key):
                    assert key not in headers and key.encode() not in recorded.raw, recorded.path
            assert [r.headers.get("Authorization") for r in other.requests[:4]] == [
                "Bearer DUMMY_API_KEY"
            ] * 4


# =============================================================================================
# 5. Redaction: the canary run
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Canaries:
    openai: str
    openrouter: str
    byok: str
    local: str
    encryption: str
    query: str
    gateway: str = ""

    def values(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}

    @classmethod
    def fresh(cls) -> Canaries:
        # Shapes no pattern of the redactor knows: only the registered exact values can catch them.
        def make(name: str) -> str:
            return f"CANARY{name}{secrets.token_hex(10)}Q"

        return cls(
            openai=make("openai"),
            openrouter=make("openrouter"),
            byok=make("byok"),
            local=make("local"),
            encryption=make("encryption"),
            query=make("query"),
        )


def find_canaries(canaries: Canaries, where: str, texts: Iterable[str | bytes]) -> list[str]:
    found = []
    for text in texts:
        blob = text.decode("latin-1") if isinstance(text, bytes) else text
        for name, value in canaries.values().items():
            forms = {value, value[6:]}  # the part after "CANARY" alone, too
            if name == "gateway":
                forms = {value, value.split("_", 2)[2]}
            for form in forms:
                if form in blob:
                    start = blob.index(form)
                    found.append(
                        f"{name} canary in {where}: ...{blob[max(0, start - 120) : start + 60]!r}..."
                    )
    return found


@dataclasses.dataclass
class CanaryUpstreams:
    openai: FakeUpstream
    openrouter: FakeUpstream
    byok: FakeUpstream
    local: FakeUpstream
    closed_port: int

    def allowed(self) -> tuple[str, ...]:
        return (
            self.byok.base_url,
            root_url(self.local),
            f"http://127.0.0.1:{self.closed_port}/v1",
        )


def _echo_401(secret: str) -> Reply:
    return Reply(
        status=401,
        json_body={
            "error": {
                "message": f"Incorrect API key provided. Received header Authorization: Bearer {secret}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "headers": {"authorization": f"Bearer {secret}", "api-key": secret},
                "api_key": secret,
            }
        },
    )


async def canary_run(
    channel: grpc.aio.Channel,
    key: str,
    ups: CanaryUpstreams,
    canaries: Canaries,
    *,
    retry_timeout: float = 20,
) -> list[str]:
    """A full run of calls, failures included; returns every text the caller saw."""
    chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
    traces = traces_pb2_grpc.ProviderTraceServiceStub(channel)
    providers = providers_pb2_grpc.ProviderServiceStub(channel)
    md = bearer(key)
    seen: list[str] = []
    step = iter(range(1000))

    def traced(request: chat_pb2.CreateRequest) -> chat_pb2.CreateRequest:
        request.trace.step_id = f"canary-step-{next(step)}"
        request.trace.run_id = "canary-run"
        return request

    async def call(awaitable: Any) -> None:
        try:
            response = await awaitable
            seen.append(str(response))
        except grpc.aio.AioRpcError as error:
            seen.extend(error_texts(error))

    # BYOK provider, with failures around it.
    await call(
        providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="canary", model_endpoint_type="openai", base_url=ups.byok.base_url, api_key=canaries.byok
            ),
            metadata=md,
            timeout=20,
        )
    )
    await call(
        providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="canary", model_endpoint_type="openai", base_url=ups.byok.base_url, api_key=canaries.byok
            ),
            metadata=md,
            timeout=20,
        )
    )  # ALREADY_EXISTS
    await call(
        providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="userinfo",
                model_endpoint_type="openai",
                base_url=f"http://u:{canaries.byok}@127.0.0.1:{ups.byok.port}/v1",
                api_key=canaries.byok,
            ),
            metadata=md,
            timeout=20,
        )
    )
    await call(
        providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="query",
                model_endpoint_type="openai",
                base_url=f"{ups.byok.base_url}?key={canaries.byok}",
                api_key=canaries.byok,
            ),
            metadata=md,
            timeout=20,
        )
    )
    await call(
        providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="badtype",
                model_endpoint_type="nope",
                base_url=ups.byok.base_url,
                api_key=canaries.byok,
            ),
            metadata=md,
            timeout=20,
        )
    )
    await call(providers.ListProviders(providers_pb2.ListProvidersRequest(), metadata=md, timeout=20))

    async def scripted(up: FakeUpstream, replies: Sequence[Reply], run: Callable[[], Any]) -> None:
        """Script the replies, make the call, drop what the retries did not consume."""
        up.replies.clear()
        up.script(*replies)
        await run()
        up.replies.clear()

    def create(request: chat_pb2.CreateRequest, timeout: float = 20) -> Callable[[], Any]:
        return lambda: call(chat.Create(traced(request), metadata=md, timeout=timeout))

    def streamed(request: chat_pb2.CreateRequest, timeout: float = 20) -> Callable[[], Any]:
        async def run() -> None:
            async def drain() -> None:
                async for event in chat.StreamCreate(traced(request), metadata=md, timeout=timeout):
                    seen.append(str(event))

            await call(drain())

        return run

    def openai_req(endpoint: str = "") -> chat_pb2.CreateRequest:
        return chat_request(endpoint or ups.openai.base_url)

    # Server-held OpenAI key: success, 401 echo, 500s echo, malformed JSON, error-in-200, 400, 429s.
    # Retryable failures get a short deadline: a server process retries with its default backoff.
    up = ups.openai
    await scripted(up, [Reply(json_body=completion("fine"))], create(openai_req()))
    await scripted(up, [_echo_401(canaries.openai)], create(openai_req()))
    await scripted(
        up,
        [Reply(status=500, raw=f"boom: Authorization: Bearer {canaries.openai}".encode())] * 8,
        create(openai_req(), retry_timeout),
    )
    await scripted(
        up,
        [
            Reply(
                status=200,
                raw=f'{{"choices": [ Bearer {canaries.openai} key={canaries.openai}'.encode(),
                content_type="application/json",
            )
        ]
        * 8,
        create(openai_req(), retry_timeout),
    )
    await scripted(
        up,
        [Reply(json_body={"error": {"message": f"bad key {canaries.openai}", "code": "weird"}})],
        create(openai_req()),
    )
    await scripted(
        up,
        [Reply(status=400, json_body={"error": {"message": f"you sent key={canaries.openai}"}})],
        create(openai_req()),
    )
    await scripted(
        up,
        [
            Reply(
                status=429,
                json_body={"error": {"message": f"limited for {canaries.openai}"}},
                headers={"Retry-After": "0"},
            )
        ]
        * 8,
        create(openai_req(), retry_timeout),
    )
    await scripted(up, [_echo_401(canaries.openai)], streamed(openai_req()))
    await scripted(
        up, [Reply(sse_raw=f"data: {{not json {canaries.openai}\n\n".encode())], streamed(openai_req())
    )
    await scripted(
        up,
        [Reply(sse=[f'{{"error": {{"message": "stream failed for {canaries.openai}", "code": 400}}}}'])],
        streamed(openai_req()),
    )
    await scripted(
        up, [Reply(sse=text_stream(["a", "b"]), break_after=2)] * 8, streamed(openai_req(), retry_timeout)
    )
    await call(chat.CountTokens(openai_req(), metadata=md, timeout=20))

    # URLs with key query parameters: allowed, not allowed, unreachable, userinfo.
    await scripted(up, [], create(openai_req(f"{ups.openai.base_url}?key={canaries.query}")))
    await create(openai_req(f"http://127.0.0.1:1/v1?key={canaries.query}"))()
    closed = f"http://127.0.0.1:{ups.closed_port}/v1"
    await create(openai_req(f"{closed}?api_key={canaries.query}&token={canaries.query}"), retry_timeout)()
    await streamed(openai_req(f"{closed}?key={canaries.query}"), retry_timeout)()
    await create(openai_req(f"http://u:{canaries.query}@127.0.0.1:{ups.byok.port}/v1"))()

    # OpenRouter key: 401 echo and 502s with an HTML page.
    openrouter_cfg = chat_pb2.LLMConfig(
        model="openai/gpt-4o-mini",
        model_endpoint_type="openai",
        model_endpoint=ups.openrouter.base_url,
        provider_name="openrouter",
        context_window=128000,
    )
    await scripted(
        ups.openrouter, [_echo_401(canaries.openrouter)], create(chat_request("", llm_config=openrouter_cfg))
    )
    await scripted(
        ups.openrouter,
        [
            Reply(
                status=502,
                raw=f"<html><title>Bad gateway {canaries.openrouter}</title></html>".encode(),
                content_type="text/html",
            )
        ]
        * 8,
        create(chat_request("", llm_config=openrouter_cfg), retry_timeout),
    )

    # BYOK: success, 401 echo, broken stream, a foreign endpoint with a query key.
    byok_cfg = chat_pb2.LLMConfig(
        model="gpt-4o-mini",
        model_endpoint_type="openai",
        provider_name="canary",
        provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
        context_window=128000,
    )
    await scripted(
        ups.byok, [Reply(json_body=completion("byok fine"))], create(chat_request("", llm_config=byok_cfg))
    )
    await scripted(ups.byok, [_echo_401(canaries.byok)], create(chat_request("", llm_config=byok_cfg)))
    await scripted(
        ups.byok,
        [Reply(sse_raw=f"data: {{{canaries.byok}\n\n".encode())],
        streamed(chat_request("", llm_config=byok_cfg)),
    )
    wrong_byok = chat_pb2.LLMConfig()
    wrong_byok.CopyFrom(byok_cfg)
    wrong_byok.model_endpoint = f"{ups.openai.base_url}?key={canaries.query}"
    await create(chat_request("", llm_config=wrong_byok))()

    # Local server key: 401 echo, 500s, malformed, success.
    local_cfg = chat_pb2.LLMConfig(
        model="m", model_endpoint_type="vllm", model_endpoint=root_url(ups.local), context_window=8000
    )
    local = ups.local
    await scripted(local, [_echo_401(canaries.local)], create(chat_request("", llm_config=local_cfg)))
    await scripted(
        local,
        [Reply(status=500, json_body={"detail": f"crash, api-key: {canaries.local}"})] * 8,
        create(chat_request("", llm_config=local_cfg), retry_timeout),
    )
    await scripted(
        local,
        [Reply(status=200, raw=f"<<{canaries.local}>>".encode(), content_type="application/json")] * 8,
        create(chat_request("", llm_config=local_cfg), retry_timeout),
    )
    await scripted(
        local,
        [
            Reply(
                json_body={
                    "choices": [{"text": "ok", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1},
                }
            )
        ],
        create(chat_request("", llm_config=local_cfg)),
    )

    # Gateway key: wrong and malformed variants.
    key_id = key.split("_")[1]
    for metadata in (
        bearer(f"llmgw_{key_id}_{canaries.query}"),
        bearer(key + "x"),
        (("authorization", key),),
        bearer(canaries.query),
    ):
        await call(chat.Create(openai_req(), metadata=metadata, timeout=20))
        await call(
            traces.ListProviderTraces(traces_pb2.ListProviderTracesRequest(), metadata=metadata, timeout=20)
        )

    # Read every trace back through the API, once the writer has stored them (bounded wait).
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        listed = await traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(page_size=1000), metadata=md, timeout=20
        )
        if len(listed.traces) >= 15 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(listed.traces) >= 15, len(listed.traces)
    seen.append(json_format.MessageToJson(listed))
    seen.append(listed.SerializeToString().decode("latin-1"))
    for trace in listed.traces:
        await call(
            traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=trace.step_id), metadata=md, timeout=20
            )
        )
    assert any(t.is_byok for t in listed.traces)
    assert any(t.error_message for t in listed.traces)
    return seen


def _canary_settings_values(canaries: Canaries, ups: CanaryUpstreams) -> dict[str, Any]:
    return {
        "auth": "required",
        "openai_api_key": canaries.openai,
        "openai_base_url": ups.openai.base_url,
        "openrouter_api_key": canaries.openrouter,
        "openrouter_base_url": ups.openrouter.base_url,
        "local_auth_type": "bearer_token",
        "local_base_url": root_url(ups.local),
        "local_api_key": canaries.local,
        "encryption_key": canaries.encryption,
        "allowed_endpoints": ups.allowed(),
    }


@asynccontextmanager
async def canary_upstreams() -> AsyncIterator[CanaryUpstreams]:
    sink = ByteSink()  # started and stopped at once: a port nothing listens on
    await sink.start()
    closed_port = sink.port
    await sink.stop()
    async with upstreams(4) as (openai_up, openrouter_up, byok_up, local_up):
        yield CanaryUpstreams(openai_up, openrouter_up, byok_up, local_up, closed_port)


async def test_canaries_appear_nowhere_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    canaries = Canaries.fresh()
    db = tmp_path / "gateway.db"
    _, key = await make_key(db, "canary-org", admin=True)
    canaries = dataclasses.replace(canaries, gateway=key)
    async with canary_upstreams() as ups:
        settings = make_settings(tmp_path, **_canary_settings_values(canaries, ups))
        async with running_gateway(settings) as gw:
            seen = await canary_run(gw.channel, key, ups, canaries)
            repr_texts = [repr(settings), str(settings)]
        # The keys did reach their upstreams (so the run exercised them) ...
        assert any(canaries.openai in str(r.headers) for r in ups.openai.requests)
        assert any(canaries.byok in str(r.headers) for r in ups.byok.requests)
        assert any(canaries.local in str(r.headers) for r in ups.local.requests)
        assert any(canaries.openrouter in str(r.headers) for r in ups.openrouter.requests)
    log_texts = [caplog.text]
    for record in caplog.records:
        log_texts += [
            record.getMessage(),
            str(record.msg),
            str(record.args),
            record.exc_text or "",
            record.stack_info or "",
        ]
    assert len(caplog.records) > 0
    problems = (
        find_canaries(canaries, "caller-visible output", seen)
        + find_canaries(canaries, "log", log_texts)
        + find_canaries(canaries, "database file", [db_bytes(tmp_path)])
        + find_canaries(canaries, "settings repr", repr_texts)
    )
    assert not problems, "\n".join(problems)


async def test_canaries_appear_nowhere_in_a_server_process(tmp_path: Path) -> None:
    """The same run against `llm-gateway serve` with DEBUG logs and the OpenTelemetry console exporter."""
    canaries = Canaries.fresh()
    db = tmp_path / "gateway.db"
    _, key = await make_key(db, "canary-org", admin=True)
    canaries = dataclasses.replace(canaries, gateway=key)
    async with canary_upstreams() as ups:
        values = _canary_settings_values(canaries, ups)
        args = [
            "--listen",
            "127.0.0.1:0",
            "--sqlite-path",
            str(db),
            "--log-level",
            "DEBUG",
            "--auth",
            "required",
            "--openai-base-url",
            values["openai_base_url"],
            "--openrouter-base-url",
            values["openrouter_base_url"],
            "--local-auth-type",
            "bearer_token",
            "--local-base-url",
            values["local_base_url"],
            "--allowed-endpoints",
            ",".join(values["allowed_endpoints"]),
        ]
        env = {
            "OPENAI_API_KEY": canaries.openai,
            "OPENROUTER_API_KEY": canaries.openrouter,
            "LLMGW_LOCAL_API_KEY": canaries.local,
            "LLMGW_ENCRYPTION_KEY": canaries.encryption,
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_SERVICE_NAME": "llm-gateway-canary",
            # Fast retries, so the 5xx cases do not take the default backoff.
            "LLMGW_GRACE_PERIOD": "2",
        }
        async with spawned_server(args, env) as server:
            async with open_channel(f"127.0.0.1:{server.port}") as channel:
                seen = await canary_run(channel, key, ups, canaries, retry_timeout=3)
        assert any(canaries.openai in str(r.headers) for r in ups.openai.requests)
        assert any(canaries.byok in str(r.headers) for r in ups.byok.requests)
    assert '"gen_ai.request.model"' in server.stdout, "the console exporter printed no span"
    assert "DEBUG" in server.stderr
    problems = (
        find_canaries(canaries, "caller-visible output", seen)
        + find_canaries(canaries, "server stderr (logs)", [server.stderr])
        + find_canaries(canaries, "server stdout (spans)", [server.stdout])
        + find_canaries(canaries, "database file", [db_bytes(tmp_path)])
    )
    assert not problems, "\n".join(problems)


# =============================================================================================
# 6. TLS
# =============================================================================================


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_credentials(certs: CertFiles, *, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=certs.read("ca_cert"))
    return grpc.ssl_channel_credentials(
        root_certificates=certs.read("ca_cert"),
        private_key=certs.read(f"{client}_key"),
        certificate_chain=certs.read(f"{client}_cert"),
    )


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[GatewayServer]:
    server = GatewayServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


async def check_works(
    address: str, credentials: grpc.ChannelCredentials | None, upstream: FakeUpstream
) -> None:
    async with open_channel(address, credentials) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        response = await chat.Create(chat_request(upstream.base_url), timeout=10)
        assert response.completion.choices[0].message.content == "Hello!"


async def check_refused(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    async with open_channel(address, credentials) as channel:
        error = await expect_error(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()


async def test_tls_server(tmp_path: Path, certs: CertFiles, upstream: FakeUpstream) -> None:
    settings = make_settings(
        tmp_path,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        allowed_endpoints=(upstream.base_url,),
    )
    async with started(settings) as server:
        for host in ("localhost", "127.0.0.1"):
            await check_works(f"{host}:{server.port}", tls_credentials(certs), upstream)
        await check_refused(f"127.0.0.1:{server.port}", None)  # plaintext client
        # A client that trusts another CA refuses the server.
        rogue_trust = grpc.ssl_channel_credentials(root_certificates=certs.read("rogue_cert"))
        await check_refused(f"localhost:{server.port}", rogue_trust)


async def test_mutual_tls(tmp_path: Path, certs: CertFiles, upstream: FakeUpstream) -> None:
    settings = make_settings(
        tmp_path,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca_cert),
        allowed_endpoints=(upstream.base_url,),
    )
    async with started(settings) as server:
        address = f"localhost:{server.port}"
        await check_refused(address, tls_credentials(certs))  # no client certificate
        await check_refused(address, tls_credentials(certs, client="rogue"))  # not signed by the CA
        await check_refused(f"127.0.0.1:{server.port}", None)
        await check_works(address, tls_credentials(certs, client="client"), upstream)
    assert len(upstream.requests) == 1


async def test_mutual_tls_flags_of_serve(tmp_path: Path, certs: CertFiles, upstream: FakeUpstream) -> None:
    args = [
        "--listen",
        "127.0.0.1:0",
        "--sqlite-path",
        str(tmp_path / "gateway.db"),
        "--allowed-endpoints",
        upstream.base_url,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca_cert),
    ]
    good = tls_credentials(certs, client="client")
    async with spawned_server(args, credentials=good, target_host="localhost") as server:
        address = f"localhost:{server.port}"
        await check_works(address, good, upstream)
        await check_refused(address, tls_credentials(certs))
        await check_refused(address, None)


def test_tls_cert_without_key_is_refused(tmp_path: Path, certs: CertFiles) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--sqlite-path",
            str(tmp_path / "gateway.db"),
            "--tls-cert",
            str(certs.server_cert),
        ],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "LLMGW_TLS_CERT (--tls-cert) and LLMGW_TLS_KEY (--tls-key) go together" in result.stderr
