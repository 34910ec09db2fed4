from __future__ import annotations

from server.grpc_runtime import apply_grpc_defaults

# The same gRPC runtime as `llm-gateway serve`, set before anything loads grpc.
apply_grpc_defaults()

from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.gateway_harness import RunningGateway, make_settings, running_gateway  # noqa: E402
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
