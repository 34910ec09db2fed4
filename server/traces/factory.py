"""Builds the configured trace backends, importing each driver only when it is used."""

from __future__ import annotations

from collections.abc import Sequence

from server.auth.redact import redact_url
from server.setting_names import BACKEND_NAMES  # re-exported: defined once
from server.traces.base import TraceBackend


def create_backends(
    names: Sequence[str],
    *,
    sqlite_path: str = "",
    postgres_dsn: str = "",
    clickhouse_url: str = "",
    socket_path: str = "",
) -> list[TraceBackend]:
    """One backend per name, in order (the first serves reads); ValueError on a bad name or setting."""
    backends: list[TraceBackend] = []
    for name in names:
        if name in (b.name for b in backends):
            raise ValueError(f"trace backend {name!r} is listed twice")
        if name == "sqlite":
            if not sqlite_path:
                raise ValueError("the sqlite trace backend needs a path")
            from server.traces.sqlite import SQLiteTraceBackend

            backends.append(SQLiteTraceBackend(sqlite_path))
        elif name == "postgres":
            if not postgres_dsn:
                raise ValueError("the postgres trace backend needs a DSN")
            from server.traces.postgres import PostgresTraceBackend

            backends.append(PostgresTraceBackend(postgres_dsn))
        elif name == "clickhouse":
            if not clickhouse_url:
                raise ValueError("the clickhouse trace backend needs a URL")
            from server.traces.clickhouse import ClickHouseTraceBackend

            backends.append(ClickHouseTraceBackend(clickhouse_url))
        elif name == "socket":
            if not socket_path:
                raise ValueError("the socket trace backend needs a socket path")
            from server.traces.socket import SocketTraceBackend

            backends.append(SocketTraceBackend(socket_path))
        else:
            raise ValueError(f"unknown trace backend {name!r}; known: {', '.join(BACKEND_NAMES)}")
    return backends


def describe_backends(
    names: Sequence[str], *, sqlite_path: str, postgres_dsn: str, clickhouse_url: str, socket_path: str
) -> str:
    """`sqlite /abs/gw.db, postgres postgresql://u:***@db/x`: where traces go, never a password."""
    where = {
        "sqlite": sqlite_path,
        "postgres": redact_url(postgres_dsn),
        "clickhouse": redact_url(clickhouse_url),
        "socket": socket_path,
    }
    return ", ".join(f"{name} {where.get(name, '')}".strip() for name in names)
