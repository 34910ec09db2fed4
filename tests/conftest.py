from __future__ import annotations

from server.grpc_runtime import apply_grpc_defaults

# The same gRPC runtime as `llm-gateway serve`, set before anything loads grpc.
apply_grpc_defaults()

import os  # noqa: E402

# Servers the tests start as processes (`llm-gateway serve`) inherit this: the admin listener's
# default port (127.0.0.1:9464) would be fought over by tests running side by side, or already be
# taken by another gateway on the machine. The admin tests give the listener a port of their own.
os.environ.setdefault("LLMGW_ADMIN_LISTEN", "")

from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.gateway_harness import RunningGateway, make_settings, running_gateway  # noqa: E402
from tests.redis_service import redis_server  # noqa: E402, F401 - a fixture
from tests.trace_services import clickhouse_server, postgres_server  # noqa: E402, F401 - session fixtures


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def gateway(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    """The real gateway in-process, allowed to call the fake upstream, traces in SQLite."""
    settings = make_settings(tmp_path, allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as running:
        yield running


def pytest_unconfigure(config: pytest.Config) -> None:
    """A failed run must end, not hang: a test that fails half-way can leak an open aiosqlite
    connection, whose worker thread is not a daemon and would keep the interpreter alive forever
    (CI would then wait out its whole time limit instead of reporting the failure)."""
    import os
    import sys
    import threading
    import time

    status = getattr(config, "_llmgw_exitstatus", 0)
    if not status:
        return
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        # Executor workers (ours are named llmgw-*) end by themselves at exit; anything else blocks it.
        stuck = [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread()
            and not t.daemon
            and t.is_alive()
            and not t.name.startswith(("ThreadPoolExecutor", "asyncio_", "llmgw-"))
        ]
        if not stuck:
            return
        time.sleep(0.2)
    names = ", ".join(sorted(t.name for t in stuck))
    sys.stderr.write(f"\nconftest: exiting past threads a failed test left running: {names}\n")
    sys.stderr.flush()
    os._exit(int(status))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._llmgw_exitstatus = exitstatus  # type: ignore[attr-defined]
