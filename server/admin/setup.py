"""Starting the admin listener and the metrics sampler with the gateway (one call from app.py)."""

from __future__ import annotations

import contextlib
import logging
import os

from server import metrics
from server.admin.access import Access
from server.admin.server import AdminServer
from server.auth.policy import Authenticator, is_loopback_only
from server.config import Settings
from server.metrics_dir import WORKER_ENV
from server.providers.http import HttpClient
from server.traces.writer import TraceWriter

log = logging.getLogger("llmgateway.admin")


class AdminConfigError(ValueError):
    """The admin listener's settings cannot be served safely."""


async def start_admin(
    settings: Settings,
    cleanup: contextlib.AsyncExitStack,
    *,
    writer: TraceWriter,
    http: HttpClient,
    authenticator: Authenticator,
) -> AdminServer | None:
    """Start the metrics sampler and, unless off or another worker serves it, the admin listener;
    both are stopped by `cleanup`. Returns the listener (None when this process serves none)."""
    metrics.configure(max_models=settings.metrics_max_models)
    sampler = metrics.Sampler(writer, http)
    sampler.start()
    cleanup.push_async_callback(sampler.stop)
    if not settings.admin_listen or os.environ.get(WORKER_ENV, "0") != "0":
        return None
    loopback = is_loopback_only(settings.admin_listen)
    if not loopback and not authenticator.enabled:
        if settings.auth.strip().lower() != "off":
            raise AdminConfigError(
                f"LLMGW_ADMIN_LISTEN={settings.admin_listen} is beyond loopback but gateway auth is off "
                "(the gRPC port listens on loopback): set LLMGW_AUTH=required and make an admin key, "
                "or keep the admin listener on loopback"
            )
        log.warning(
            "LLMGW_AUTH=off and the admin listener is on %s: anyone who can reach it reads every trace",
            settings.admin_listen,
        )
    admin = AdminServer(
        settings.admin_listen, reader=writer.reader, access=Access(authenticator, loopback=loopback)
    )
    try:
        await admin.start()
    except OSError as exc:
        raise OSError(f"could not listen on LLMGW_ADMIN_LISTEN={settings.admin_listen}: {exc}") from exc
    cleanup.push_async_callback(admin.stop)
    return admin
