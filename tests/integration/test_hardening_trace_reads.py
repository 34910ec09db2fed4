"""Issue 12 item 2: a non-admin key reads only its own user's traces, through the real server.

Keys are made straight in the auth store; the calls, the traces and the reads go through the
real gateway, on SQLite and (marked slow) on real PostgreSQL and ClickHouse servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from llmgateway.v1 import chat_pb2, traces_pb2

from server.auth.factory import create_auth_store
from server.config import Settings
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.trace_polling import list_all, wait_for_trace
from tests.trace_services import (
    ClickHouseServer,
    PostgresServer,
    fresh_clickhouse_database,
    fresh_postgres_database,
)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def make_key(settings: Settings, org: str, *, admin: bool = False, user: str = "") -> str:
    store = create_auth_store(settings)
    await store.start()
    try:
        _, key = await store.create_key(organization_id=org, user_id=user, is_admin=admin)
        return key
    finally:
        await store.close()


async def call(gw: RunningGateway, upstream: FakeUpstream, key: str, step: str, *, user_id: str = "") -> str:
    request = chat_request(
        upstream.base_url,
        user_id=user_id,
        trace=chat_pb2.TraceContext(step_id=step, run_id="run-shared", agent_id="agent-shared"),
    )
    response = await gw.chat.Create(request, metadata=bearer(key), timeout=10)
    return response.provider_trace_id


async def steps_seen(gw: RunningGateway, key: str, **filters: Any) -> set[str]:
    request = traces_pb2.ListProviderTracesRequest(page_size=1000, **filters)
    return {t.step_id for t in await list_all(gw.traces, request, metadata=bearer(key))}


async def get_code(gw: RunningGateway, key: str, step: str) -> grpc.StatusCode:
    try:
        await gw.traces.GetProviderTrace(
            traces_pb2.GetProviderTraceRequest(step_id=step), metadata=bearer(key), timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def check_reads_are_per_user(settings: Settings, upstream: FakeUpstream) -> None:
    alice = await make_key(settings, "org-x", user="alice")
    alice_second = await make_key(settings, "org-x", user="alice")  # a rotated key of the same user
    bob = await make_key(settings, "org-x", user="bob")
    service = await make_key(settings, "org-x")  # an organization-level key: no user
    service_other = await make_key(settings, "org-x")
    admin = await make_key(settings, "org-x", admin=True)
    async with running_gateway(settings) as gw:
        await call(gw, upstream, alice, "step-alice")
        # Bob claims to be alice in the request: his trace must stay his.
        await call(gw, upstream, bob, "step-bob", user_id="alice")
        await call(gw, upstream, service, "step-service")
        await call(gw, upstream, admin, "step-admin")
        for step in ("step-alice", "step-bob", "step-service", "step-admin"):
            await wait_for_trace(gw.traces, step, metadata=bearer(admin))

        everything = {"step-alice", "step-bob", "step-service", "step-admin"}
        assert await steps_seen(gw, admin) == everything
        assert await steps_seen(gw, alice) == {"step-alice"}
        assert await steps_seen(gw, alice_second) == {"step-alice"}
        assert await steps_seen(gw, bob) == {"step-bob"}
        assert await steps_seen(gw, service) == {"step-service"}
        assert await steps_seen(gw, service_other) == set()
        # Filters cannot widen the scope.
        for filters in ({"run_id": "run-shared"}, {"agent_id": "agent-shared"}, {"step_id": "step-bob"}):
            assert await steps_seen(gw, alice, **filters) <= {"step-alice"}

        assert await get_code(gw, alice, "step-alice") == grpc.StatusCode.OK
        assert await get_code(gw, alice, "step-bob") == grpc.StatusCode.NOT_FOUND
        assert await get_code(gw, alice, "step-service") == grpc.StatusCode.NOT_FOUND
        assert await get_code(gw, bob, "step-alice") == grpc.StatusCode.NOT_FOUND
        assert await get_code(gw, service, "step-bob") == grpc.StatusCode.NOT_FOUND
        assert await get_code(gw, service_other, "step-service") == grpc.StatusCode.NOT_FOUND
        assert await get_code(gw, admin, "step-bob") == grpc.StatusCode.OK
        # The request's user_id is still what the trace reports (the seed's field), ...
        bob_trace = await wait_for_trace(gw.traces, "step-bob", metadata=bearer(bob))
        assert bob_trace.user_id == "alice"


async def test_sqlite_non_admin_keys_read_only_their_users_traces(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, auth="required", allowed_endpoints=(upstream.base_url,))
    await check_reads_are_per_user(settings, upstream)


@pytest.mark.slow
async def test_postgres_non_admin_keys_read_only_their_users_traces(
    tmp_path: Path, upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    dsn = await fresh_postgres_database(postgres_server)
    settings = make_settings(
        tmp_path,
        auth="required",
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("postgres",),
        postgres_dsn=dsn,
    )
    await check_reads_are_per_user(settings, upstream)


@pytest.mark.slow
async def test_clickhouse_non_admin_keys_read_only_their_users_traces(
    tmp_path: Path, upstream: FakeUpstream, clickhouse_server: ClickHouseServer
) -> None:
    settings = make_settings(
        tmp_path,
        auth="required",
        allowed_endpoints=(upstream.base_url,),
        trace_backends=("clickhouse",),
        clickhouse_url=clickhouse_server.url(fresh_clickhouse_database()),
    )
    await check_reads_are_per_user(settings, upstream)


async def test_auth_off_reads_every_trace_as_before(tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = make_settings(tmp_path, auth="off", allowed_endpoints=(upstream.base_url,))
    async with running_gateway(settings) as gw:
        for step, user in (("s1", "alice"), ("s2", "bob"), ("s3", "")):
            await gw.chat.Create(
                chat_request(upstream.base_url, user_id=user, trace=chat_pb2.TraceContext(step_id=step)),
                timeout=10,
            )
        for step in ("s1", "s2", "s3"):
            await wait_for_trace(gw.traces, step)
        traces = await list_all(gw.traces)
        assert {t.step_id for t in traces} == {"s1", "s2", "s3"}
        assert {t.user_id for t in traces} == {"alice", "bob", ""}
