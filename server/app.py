"""Builds and runs the grpc.aio server: services, health, reflection, telemetry, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2, usage_pb2

from server.admin.server import AdminServer
from server.admin.setup import start_admin
from server.api.auth import KeyAuthenticator
from server.api.chat import ChatCompletionServicer
from server.api.handlers import Service
from server.api.providers import ProviderServicer
from server.api.status import abort
from server.api.traces import ProviderTraceServicer
from server.api.usage import LimitsServicer, UsageServicer
from server.auth.byok import resolve_byok
from server.auth.crypto import Keyring
from server.auth.endpoints import EndpointPolicy
from server.auth.factory import create_auth_store, key_store_location, stranded_keys
from server.auth.policy import Authenticator, auth_required
from server.auth.redact import Redactor, install_log_redaction
from server.auth.store import AuthStore
from server.billing.meter import Meter
from server.billing.prices import PriceTable
from server.config import Settings
from server.core import tokens
from server.core.keys import ByokProvider
from server.errors import ShuttingDown
from server.gateway import Dependencies, Gateway
from server.gc_tuning import tune_for_serving
from server.grpc_options import connection_options, pending_call_options
from server.inflight import InFlight, uncancel_current
from server.limits.book import LimitsBook
from server.limits.counters import Counters, MemoryCounters
from server.limits.limiter import Limiter
from server.providers.http import HttpClient
from server.providers.proxy import ProxyConfig
from server.reflection import JsonNameReflectionServicer, enable_reflection
from server.routing.router import Router
from server.serving_health import HealthMonitor
from server.telemetry import Tracing, setup_tracing
from server.traces.factory import create_backends, describe_backends
from server.traces.retention import RetentionPruner
from server.traces.writer import TraceWriter

if TYPE_CHECKING:
    from server.routing.shared_cooldowns import SharedCooldowns

log = logging.getLogger("llmgateway")

SERVICE_NAMES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatCompletionService"].full_name,
    traces_pb2.DESCRIPTOR.services_by_name["ProviderTraceService"].full_name,
    providers_pb2.DESCRIPTOR.services_by_name["ProviderService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["LimitsService"].full_name,
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Shutdown: calls still queued inside grpc when the signal came start within SETTLE_QUIET of
# quiet (bounded by SETTLE_LIMIT). Then health checks and reflection are refused (UNAVAILABLE
# SHUTTING_DOWN). If calls were still coming at over REFUSE_BACKLOG_RATE a second, every new call
# is refused until SETTLE_QUIET passes with none, for at most REFUSE_LIMIT; else they are served
# until STOP_QUIET passes with none, for at most STOP_QUIET_LIMIT. Only then does grpc's stop
# begin. Calls cut at the end of the grace period get CUT_ALLOWANCE to send their status and
# trace before grpc cancels whatever is left.
SETTLE_QUIET = 0.1
SETTLE_LIMIT = 1.0
REFUSE_BACKLOG_RATE = 100.0
REFUSE_LIMIT = 3.0
STOP_QUIET = 0.25
STOP_QUIET_LIMIT = 1.0
CUT_ALLOWANCE = 2.0


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's health servicer, except that its Watch streams end when the server stops, and that
    the drain counts and refuses its calls like any other (`InFlight.admit`).

    grpc's Watch never returns: one left open held `server.stop()` for the whole grace period
    (with no call in flight) and then ended with grpc's bare status. `end_watches` ends them
    with UNAVAILABLE SHUTTING_DOWN, after they were told NOT_SERVING.

    A Check the drain neither counted nor refused was answered NOT_SERVING right up to grpc's
    stop, and the one arriving as it began got grpc's bare CANCELLED (see `GatewayServer.stop`).
    """

    def __init__(self, calls: InFlight) -> None:
        super().__init__()
        self._calls = calls
        self._watches: set[asyncio.Task[Any]] = set()
        self._ending = False

    async def Check(  # noqa: N802 - gRPC's name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        await self._calls.admit(context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802 - gRPC's name
        await self._calls.admit(context)
        task = asyncio.current_task()
        if task is not None:
            self._watches.add(task)
        try:
            await super().Watch(request, context)
        except asyncio.CancelledError:
            if not self._ending:
                raise  # the watcher went away
            uncancel_current()
        finally:
            if task is not None:
                self._watches.discard(task)
        await abort(context, ShuttingDown("the server is shutting down", metadata={"phase": "health"}))

    def end_watches(self) -> None:
        self._ending = True
        for task in self._watches:
            task.cancel()


@dataclass(slots=True)
class _Running:
    server: grpc.aio.Server
    health: _Health
    writer: TraceWriter
    store: AuthStore
    http: HttpClient
    port: int
    tracing: Tracing | None
    calls: InFlight
    router: Router
    monitor: HealthMonitor
    pruner: RetentionPruner | None
    counters: Counters
    cooldowns: SharedCooldowns | None = None
    reflection: JsonNameReflectionServicer | None = None


class GatewayServer:
    """One server process. `start()` binds and serves; `stop()` drains and flushes traces."""

    def __init__(self, settings: Settings, *, span_exporter: Any = None) -> None:
        self.settings = settings
        self._span_exporter = span_exporter  # tests: an in-memory OpenTelemetry exporter
        self._running: _Running | None = None
        self.admin: AdminServer | None = None  # the admin listener, when this process serves it
        self._admin_stack = contextlib.AsyncExitStack()
        self.gateway: Gateway | None = None  # tests: its limiter and meter

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
        proxies = ProxyConfig.from_environ(os.environ)  # a garbled HTTPS_PROXY refuses to start

        # Load the tokenizers now so the first request does not pay for it (~0.4 s).
        await asyncio.to_thread(tokens.preload)
        store = create_auth_store(settings)
        await store.start()
        cleanup.push_async_callback(store.close)
        stranded = await stranded_keys(settings, store)
        if stranded is not None:
            if stranded[1]:  # an empty store would even turn `LLMGW_AUTH=auto` off: refuse
                raise ValueError(stranded[0])
            log.warning("%s", stranded[0])
        required = auth_required(settings.auth, settings.listen, has_keys=await store.has_keys())

        backends = create_backends(
            settings.trace_backends,
            sqlite_path=settings.sqlite_path,
            postgres_dsn=settings.postgres_dsn,
            clickhouse_url=settings.clickhouse_url,
            socket_path=settings.trace_socket,
        )
        writer = TraceWriter(backends, queue_bytes=settings.trace_queue_bytes)
        # Before start(): a signal while it waits for a slow backend cancels it, and the lanes it
        # already started (the SQLite one holds a non-daemon thread) must still be closed. Only a
        # failed or interrupted start-up gets here: nothing was served, so no trace is queued.
        cleanup.push_async_callback(writer.close, timeout=1.0)
        await writer.start()
        pruner = None
        if settings.trace_retention:
            pruner = RetentionPruner(writer.backends, settings.trace_retention)
            await pruner.start()
            cleanup.push_async_callback(pruner.close)

        http = HttpClient(proxies=proxies)
        if proxies is not None:
            log.info("egress through a proxy: %s", proxies.describe())
        cleanup.push_async_callback(http.close)
        policy = EndpointPolicy.from_settings(settings)

        keyring = Keyring.from_settings(settings)

        async def byok_provider(organization_id: str, name: str) -> ByokProvider | None:
            found = await resolve_byok(
                store,
                keyring=keyring,
                organization_id=organization_id,
                provider_name=name,
                redactor=redactor,
            )
            record = found.provider
            # The lease travels with the call's target: its key stays known until the call ends.
            return ByokProvider(
                record.name,
                record.base_url,
                found.api_key,
                record.endpoint_type,
                keep=redactor.lease(found.api_key),
            )

        async def byok_urls(organization_id: str) -> Sequence[str]:
            return await store.byok_base_urls(organization_id=organization_id)

        # A routes file that cannot be used stops start-up (the message names its line).
        router = Router.from_settings(settings, environ=os.environ, register_secrets=redactor.add_many)
        cooldowns = await _shared_cooldowns(settings, router)
        if cooldowns is not None:
            cleanup.push_async_callback(cooldowns.close)
        prices = await asyncio.to_thread(PriceTable.load, settings.prices_file)  # a bad file stops start-up
        counters = _limit_counters(settings)
        cleanup.push_async_callback(counters.close)
        limiter = Limiter(LimitsBook(store), counters, prices)

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
                router=router,
                meter=Meter(prices),
                limiter=limiter,
            )
        )
        self.gateway = gateway
        policy_authenticator = Authenticator(store, enabled=required)
        authenticator = KeyAuthenticator(policy_authenticator)
        # Its own stack: closed by stop() after the traces are flushed (their last counts scraped).
        admin_stack = contextlib.AsyncExitStack()
        cleanup.push_async_callback(admin_stack.aclose)
        self.admin = await start_admin(
            settings, admin_stack, writer=writer, http=http, authenticator=policy_authenticator
        )
        self._admin_stack = admin_stack

        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Only workers of one gateway share a port: a second server on a taken port
                # must fail to start, not split the traffic with the first.
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                *connection_options(settings),  # age and keepalive, for load balancers
                *pending_call_options(settings),  # a burst of new calls waits, is not cancelled
            ],
        )
        services = (
            ChatCompletionServicer(gateway, authenticator).handlers(),
            ProviderTraceServicer(
                writer.reader, authenticator, page_bytes=settings.trace_page_bytes
            ).handlers(),
            ProviderServicer(store, authenticator, policy, keyring=keyring, redactor=redactor).handlers(),
            UsageServicer(writer.reader, authenticator).handlers(),
            LimitsServicer(store, limiter.book, authenticator).handlers(),
        )
        calls = InFlight(abort)
        for handlers in services:
            assert isinstance(handlers, Service), handlers
            handlers.track(calls)
        server.add_generic_rpc_handlers(services)
        health_servicer = _Health(calls)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection = enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME), admit=calls.admit)

        cleanup.push_async_callback(server.stop, None)
        port = _bind(server, settings)
        await server.start()

        async def set_serving(serving: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in (*SERVICE_NAMES, ""):
                await health_servicer.set(name, status)

        monitor = HealthMonitor(store=store, auth_required=required, writer=writer, set_serving=set_serving)
        monitor.start()
        cleanup.push_async_callback(monitor.close)
        self._running = _Running(
            server,
            health_servicer,
            writer,
            store,
            http,
            port,
            tracing,
            calls,
            router,
            monitor,
            pruner,
            counters,
            cooldowns,
            reflection,
        )
        log.info(
            "llm-gateway serving on %s (port %d), auth %s, traces %s",
            settings.listen,
            port,
            "required" if required else "off",
            ",".join(settings.trace_backends),
        )
        log.info(
            "keys and BYOK providers in %s; traces in %s",
            key_store_location(settings),
            describe_backends(
                settings.trace_backends,
                sqlite_path=settings.sqlite_path,
                postgres_dsn=settings.postgres_dsn,
                clickhouse_url=settings.clickhouse_url,
                socket_path=settings.trace_socket,
            ),
        )
        return port

    async def reload_routes(self) -> bool:
        """SIGHUP: read the routes file again; calls in flight finish on the routes they started with."""
        running = self._running
        return await running.router.reload() if running is not None else False

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: NOT_SERVING, refuse new calls, let in-flight ones finish, flush traces."""
        running = self._running
        if running is None:
            return
        self._running = None
        grace = self.settings.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        ends = loop.time() + grace
        calls = running.calls
        await running.monitor.close()  # it must not turn a stopping server SERVING again
        await running.health.enter_graceful_shutdown()
        # Calls that arrived before the signal but still wait inside grpc for a handler would be
        # cancelled by grpc (a bare CANCELLED) the moment server.stop() begins: let them start.
        settling, entered, checks = loop.time(), calls.entered - calls.untracked, calls.untracked
        settled = await calls.settle(quiet=SETTLE_QUIET, limit=min(SETTLE_LIMIT, grace / 2))
        # The backlog is of tracked calls only: a storm of health checks (refused from here
        # anyway) is no queue of real ones, and must not get steady traffic refused.
        rate = (calls.entered - calls.untracked - entered) / max(loop.time() - settling, SETTLE_QUIET)
        # grpc's stop cancels, bare CANCELLED, every call that reaches it after it began
        # (grpc/grpc#41785): one still queued, one whose connection was accepted just before the
        # listener closed, one sent before its client read the GOAWAY. We cannot answer those;
        # we can begin the stop when nothing is coming. Health checks and reflection are refused
        # from here ("retry on another instance"): a checker told so stops calling here.
        calls.close_untracked()
        if not settled and rate >= REFUSE_BACKLOG_RATE:
            # Still coming as fast as the loop takes them: grpc's queue (up to
            # LLMGW_GRPC_MAX_PENDING_CALLS deep) is not empty, and grpc would cancel the rest
            # bare. Refuse them (no upstream call), ~5,000 a second on an idle worker, until quiet.
            calls.refuse_new()
            quiet, limit = SETTLE_QUIET, REFUSE_LIMIT
        else:
            # Steady traffic is still served, not refused (a refusal is an error its clients see;
            # they move to another replica at the GOAWAY): the stop waits for a pause in it.
            quiet, limit = STOP_QUIET, STOP_QUIET_LIMIT
        end = loop.time() + max(0.0, min(limit, ends - grace / 2 - loop.time()))
        # A checker that called since the signal is waited for until it was refused once (it
        # then pauses): one slower than the quiet period would be calling as the stop began.
        checked = calls.untracked != checks
        while True:
            await calls.settle(quiet=quiet, limit=max(0.0, end - loop.time()))
            if not checked or calls.untracked_refused or loop.time() >= end:
                break
        # grpc's stop: GOAWAY, the listener closes (a new connection is refused: UNAVAILABLE at
        # the client). grpc's own cancel at the end of its grace is only the fallback: it sends
        # no ErrorInfo, and handlers unwind after stop() returned.
        stopping = asyncio.create_task(running.server.stop(max(0.0, ends - loop.time()) + CUT_ALLOWANCE))
        if not await calls.wait_idle(ends - loop.time()):
            cut = calls.cut(grace)
            log.warning(
                "grace period of %g s over: ending %d calls still running with UNAVAILABLE SHUTTING_DOWN",
                grace,
                cut,
            )
            await calls.wait_idle(CUT_ALLOWANCE)
        running.health.end_watches()  # they saw NOT_SERVING; nothing is left to watch
        if running.reflection is not None:
            running.reflection.end_streams()  # else one left open holds grpc's stop to the grace end
        await stopping
        # A handler grpc cancelled itself may still be unwinding (writing its trace).
        if not await calls.wait_idle(CUT_ALLOWANCE):
            log.warning(
                "%d calls still unwinding after the server stopped; their traces may be lost", len(calls)
            )
        if running.pruner is not None:
            await running.pruner.close()
        await running.writer.close(timeout=max(grace, 5.0))
        await self._admin_stack.aclose()
        await running.http.close()
        await running.counters.close()  # after the calls: their last settles are sent
        if running.cooldowns is not None:
            await running.cooldowns.close()
        await running.store.close()
        if running.tracing is not None:
            running.tracing.shutdown()  # exports the spans still batched


def _limit_counters(settings: Settings) -> Counters:
    if not settings.redis_url:
        return MemoryCounters()
    from server.limits.redis_counters import RedisCounters  # only a Redis deployment imports redis

    return RedisCounters(settings.redis_url, fail_open=settings.limits_redis_failure == "open")


async def _shared_cooldowns(settings: Settings, router: Router) -> SharedCooldowns | None:
    if not settings.redis_url:
        return None
    from server.routing.shared_cooldowns import SharedCooldowns as Shared  # imports redis

    shared = Shared(settings.redis_url, router.health)
    shared.start()
    # Serve knowing the cooldowns already running; Redis down delays start-up by 1 s at most.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shared.connected.wait(), 1.0)
    return shared


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


async def serve(settings: Settings, *, signalled: Sequence[int] = ()) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; the process exit code.

    The handlers are in place before start-up, and a signal during start-up (`signalled`: one
    that came even earlier, while the process was importing) stops it: a killed server exits
    -15 with nothing cleaned up, and PID 1 in a container ignores a SIGTERM it does not handle.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    if signalled:
        stop_requested.set()
    gateway = GatewayServer(settings)
    reloads: set[asyncio.Task[bool]] = set()
    # A SIGHUP while start() runs may come after start() read the routes file: dropped, the
    # worker would serve the file it replaced until the next SIGHUP. Kept for after start-up.
    reload_after_start = False

    def reload_routes() -> None:
        nonlocal reload_after_start
        if not starting.done():
            reload_after_start = True
            return
        task = asyncio.create_task(gateway.reload_routes())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    starting = asyncio.create_task(gateway.start())
    loop.add_signal_handler(signal.SIGHUP, reload_routes)
    waiting = asyncio.create_task(stop_requested.wait())
    await asyncio.wait((starting, waiting), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("signal during start-up: stopping before serving")
        starting.cancel()  # start() closes what it had opened
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        if not starting.cancelled() and starting.exception() is None:
            await gateway.stop()  # it finished starting as it was cancelled
        log.info("stopped")
        return 0
    starting.result()  # a start-up failure raises here
    if reload_after_start:
        reload_routes()
    tune_for_serving()  # the process only (tests start many servers in one process: not there)
    await waiting
    log.info(
        "shutting down: finishing in-flight calls (grace %.1f s) and flushing traces", settings.grace_period
    )
    await gateway.stop()
    log.info("stopped")
    return 0
