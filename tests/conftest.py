from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.trace_services import clickhouse_server, postgres_server  # noqa: F401 - session fixtures


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
