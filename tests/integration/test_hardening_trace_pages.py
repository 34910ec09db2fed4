"""Issue 12 item 13 (trace reads break on big traces) and other unbounded trace reads.

Through the real server: pages are bounded in bytes (`LLMGW_TRACE_PAGE_BYTES`, small here so
no test sends megabytes), a trace bigger than a page comes back cut with `truncated` set, and
filters a store cannot take are refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from llmgateway.v1 import chat_pb2, traces_pb2

from server.config import load_settings
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.trace_polling import list_all, wait_for_trace
from tests.trace_services import fresh_clickhouse_database, fresh_postgres_database

PAGE_BYTES = 200_000

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.slow),
    pytest.param("clickhouse", marks=pytest.mark.slow),
]


@pytest.fixture(params=BACKENDS)
async def gw(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> AsyncIterator[RunningGateway]:
    overrides: dict[str, Any] = {"trace_backends": (request.param,)}
    if request.param == "postgres":
        overrides["postgres_dsn"] = await fresh_postgres_database(request.getfixturevalue("postgres_server"))
    elif request.param == "clickhouse":
        server = request.getfixturevalue("clickhouse_server")
        overrides["clickhouse_url"] = server.url(fresh_clickhouse_database())
    settings = make_settings(
        tmp_path, allowed_endpoints=(upstream.base_url,), trace_page_bytes=PAGE_BYTES, **overrides
    )
    async with running_gateway(settings) as running:
        yield running


async def create(gw: RunningGateway, upstream: FakeUpstream, step: str, chars: int, run: str) -> str:
    request = chat_request(
        upstream.base_url,
        (chat_pb2.ROLE_USER, "x " * (chars // 2)),
        context_window=2_000_000,
        trace=chat_pb2.TraceContext(step_id=step, run_id=run),
    )
    response = await gw.chat.Create(request, timeout=30)
    return response.provider_trace_id


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo")


async def test_pages_end_early_at_the_byte_bound(gw: RunningGateway, upstream: FakeUpstream) -> None:
    ids = [await create(gw, upstream, f"s{i}", 60_000, "run-big") for i in range(10)]
    await wait_for_trace(gw.traces, "s9", trace_id=ids[-1])
    await wait_for_trace(gw.traces, "s0", trace_id=ids[0])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await gw.traces.ListProviderTraces(
            traces_pb2.ListProviderTracesRequest(run_id="run-big", page_size=50, page_token=token), timeout=10
        )
        pages += 1
        assert page.ByteSize() <= PAGE_BYTES
        assert page.traces, "a page that ends early still holds a trace"
        assert not any(t.truncated for t in page.traces)
        seen.extend(t.id for t in page.traces)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))  # every trace once, newest first
    assert pages >= 4  # ~60 kB each, 200 kB a page


async def test_a_trace_bigger_than_a_page_is_returned_truncated(
    gw: RunningGateway, upstream: FakeUpstream
) -> None:
    small = await create(gw, upstream, "small", 1_000, "run-mixed")
    huge = await create(gw, upstream, "huge", 400_000, "run-mixed")
    await wait_for_trace(gw.traces, "small", trace_id=small)
    got = await wait_for_trace(gw.traces, "huge", trace_id=huge)
    assert got.truncated
    assert got.request_json.startswith('{"model"')  # the head of what went up
    response = await gw.traces.GetProviderTrace(
        traces_pb2.GetProviderTraceRequest(step_id="huge"), timeout=10
    )
    assert response.ByteSize() <= PAGE_BYTES
    traces = await list_all(gw.traces, traces_pb2.ListProviderTracesRequest(run_id="run-mixed"))
    assert [t.id for t in traces] == [huge, small]
    assert [t.truncated for t in traces] == [True, False]
    assert traces[1].request_json.endswith("}")  # the small one whole


async def test_filters_a_store_cannot_take_are_refused(gw: RunningGateway) -> None:
    cases = [
        (traces_pb2.ListProviderTracesRequest(step_id="s" * 300_000), "step_id"),
        (traces_pb2.ListProviderTracesRequest(run_id="r" * 300_000), "run_id"),
        (traces_pb2.ListProviderTracesRequest(agent_id="a" * 300_000), "agent_id"),
        (traces_pb2.ListProviderTracesRequest(page_token="A" * 300_000), "page_token"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gw.traces.ListProviderTraces(request, timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, failure.value.details())
        info = error_info(failure.value)
        assert info.reason == "INVALID_REQUEST" and info.metadata["field"] == field
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gw.traces.GetProviderTrace(
            traces_pb2.GetProviderTraceRequest(step_id="s" * 300_000), timeout=10
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(failure.value).metadata["field"] == "step_id"


def test_the_page_byte_bound_is_a_setting() -> None:
    assert load_settings(environ={}).trace_page_bytes == 4 * 1024 * 1024
    assert load_settings(environ={"LLMGW_TRACE_PAGE_BYTES": "100000"}).trace_page_bytes == 100_000
    for bad in ("0", str(64 * 1024 * 1024)):
        with pytest.raises(ValueError, match="LLMGW_TRACE_PAGE_BYTES"):
            load_settings(environ={"LLMGW_TRACE_PAGE_BYTES": bad})
