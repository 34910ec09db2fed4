"""Builds and runs the grpc.aio server: services, health, reflection, telemetry, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

from server.api.auth import KeyAuthenticator
from server.api.chat import ChatCompletionServicer
from server.api.providers import ProviderServicer
from server.api.traces import ProviderTraceServicer
from server.auth.byok import resolve_byok
from server.auth.endpoints import EndpointPolicy
from server.auth.policy import Authenticator, auth_required
from server.auth.redact import Redactor, install_log_redaction
from server.auth.store import AuthStore, create_auth_store
from server.config import Settings
from server.core import tokens
from server.core.keys import ByokProvider
from server.gateway import Dependencies, Gateway
from server.providers.http import HttpClient
from server.reflection import enable_reflection
from server.telemetry import Tracing, setup_tracing
from server.traces.factory import create_backends
from server.traces.writer import TraceWriter

log = logging.getLogger("llmgateway")

SERVICE_NAMES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatCompletionService"].full_name,
    traces_pb2.DESCRIPTOR.services_by_name["ProviderTraceService"].full_name,
    providers_pb2.DESCRIPTOR.services_by_name["ProviderService"].full_name,
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    writer: TraceWriter
    store: AuthStore
    http: HttpClient
    port: int
    tracing: Tracing | None


class GatewayServer:
    """One server process. `start()` binds and serves; `stop()` drains and flushes traces."""

    def __init__(self, settings: Settings, *, span_exporter: Any = None) -> None:
        self.settings = settings
        self._span_exporter = span_exporter  # tests: an in-memory OpenTelemetry exporter
        self._running: _Running | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._running is not None, "not started"
        return self._running.port

    async def start(self) -> int:
        """Open stores, writer and pool, bind and serve; on any failure, close what was opened."""
        async with contextlib.AsyncExitStack() as cleanup:
            port = await self._start(cleanup)
            cleanup.pop_all()  # started: stop() owns the resources now
            return port
        raise AssertionError("unreachable")

    async def _start(self, cleanup: contextlib.AsyncExitStack) -> int:
        settings = self.settings
        redactor = Redactor.from_settings(settings)
        install_log_redaction(redactor)

        # Load the tokenizers now so the first request does not pay for it (~0.4 s).
        await asyncio.to_thread(tokens.preload)
        store = create_auth_store(settings)
        await store.start()
        cleanup.push_async_callback(store.close)
        required = auth_required(settings.auth, settings.listen, has_keys=await store.has_keys())

        backends = create_backends(
            settings.trace_backends,
            sqlite_path=settings.sqlite_path,
            postgres_dsn=settings.postgres_dsn,
            clickhouse_url=settings.clickhouse_url,
            socket_path=settings.trace_socket,
        )
        writer = TraceWriter(backends)
        await writer.start()
        cleanup.push_async_callback(writer.close, timeout=settings.grace_period)

        http = HttpClient()
        cleanup.push_async_callback(http.close)
        policy = EndpointPolicy.from_settings(settings)

        async def byok_provider(organization_id: str, name: str) -> ByokProvider | None:
            found = await resolve_byok(
                store,
                passphrase=settings.encryption_key,
                organization_id=organization_id,
                provider_name=name,
                redactor=redactor,
            )
            record = found.provider
            return ByokProvider(record.name, record.base_url, found.api_key, record.endpoint_type)

        async def byok_urls(organization_id: str) -> Sequence[str]:
            return await store.byok_base_urls(organization_id=organization_id)

        tracing = setup_tracing(exporter_override=self._span_exporter)
        if tracing is not None:
            cleanup.callback(tracing.shutdown)
        tracer, interceptors = (tracing.tracer, [tracing.interceptor]) if tracing else (None, [])
        gateway = Gateway(
            Dependencies(
                settings=settings,
                http=http,
                traces=writer,
                policy=policy,
                byok_provider=byok_provider,
                byok_urls=byok_urls,
                scrub=redactor.redact,
                tracer=tracer,
                redactor=redactor,
            )
        )
        authenticator = KeyAuthenticator(Authenticator(store, enabled=required))

        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 1),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        server.add_generic_rpc_handlers(
            (
                ChatCompletionServicer(gateway, authenticator).handlers(),
                ProviderTraceServicer(writer.reader, authenticator).handlers(),
                ProviderServicer(
                    store, authenticator, policy, encryption_key=settings.encryption_key, redactor=redactor
                ).handlers(),
            )
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))

        cleanup.push_async_callback(server.stop, None)
        port = _bind(server, settings)
        await server.start()
        self._running = _Running(server, health_servicer, writer, store, http, port, tracing)
        log.info(
            "llm-gateway serving on %s (port %d), auth %s, traces %s",
            settings.listen,
            port,
            "required" if required else "off",
            ",".join(settings.trace_backends),
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: NOT_SERVING, refuse new calls, let in-flight ones finish, flush traces."""
        running = self._running
        if running is None:
            return
        self._running = None
        grace = self.settings.grace_period if grace is None else grace
        await running.health.enter_graceful_shutdown()
        await running.server.stop(grace)
        await running.writer.close(timeout=max(grace, 5.0))
        await running.http.close()
        await running.store.close()
        if running.tracing is not None:
            running.tracing.shutdown()  # exports the spans still batched
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    if settings.tls_cert:
        with open(settings.tls_cert, "rb") as f:
            cert = f.read()
        with open(settings.tls_key, "rb") as f:
            key = f.read()
        client_ca = None
        if settings.tls_client_ca:
            with open(settings.tls_client_ca, "rb") as f:
                client_ca = f.read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        port = server.add_secure_port(settings.listen, credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"could not listen on {settings.listen}")
    return int(port)


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    try:
        return int(_add_port(server, settings))
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise OSError(f"could not listen on {settings.listen}: {exc}") from exc


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; the process exit code."""
    gateway = GatewayServer(settings)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    log.info(
        "shutting down: finishing in-flight calls (grace %.1f s) and flushing traces", settings.grace_period
    )
    await gateway.stop()
    log.info("stopped")
    return 0
