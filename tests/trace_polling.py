"""Waiting for traces through the public RPCs: the request path only enqueues, so a trace lands
in the store a moment after the call that made it answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
from llmgateway.v1 import traces_pb2, traces_pb2_grpc

Metadata = Sequence[tuple[str, str]] | None


async def wait_for_trace(
    stub: traces_pb2_grpc.ProviderTraceServiceStub,
    step_id: str,
    *,
    metadata: Metadata = None,
    trace_id: str = "",
    timeout: float = 10.0,
) -> traces_pb2.ProviderTrace:
    """GetProviderTrace(step_id) once it answers (with `trace_id`, when given); NOT_FOUND is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = await stub.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=step_id), metadata=metadata, timeout=5
            )
            if not trace_id or response.trace.id == trace_id:
                return response.trace
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"no trace {trace_id or ''} for step {step_id!r} after {timeout}s")
        await asyncio.sleep(0.02)


async def list_all(
    stub: traces_pb2_grpc.ProviderTraceServiceStub,
    request: traces_pb2.ListProviderTracesRequest | None = None,
    *,
    metadata: Metadata = None,
) -> list[traces_pb2.ProviderTrace]:
    """Every trace matching `request`, following next_page_token to the end."""
    request = request or traces_pb2.ListProviderTracesRequest(page_size=1000)
    out: list[traces_pb2.ProviderTrace] = []
    token = ""
    while True:
        page_request = traces_pb2.ListProviderTracesRequest()
        page_request.CopyFrom(request)
        page_request.page_token = token
        page = await stub.ListProviderTraces(page_request, metadata=metadata, timeout=10)
        out.extend(page.traces)
        token = page.next_page_token
        if not token:
            return out


async def wait_for_count(
    stub: traces_pb2_grpc.ProviderTraceServiceStub,
    count: int,
    request: traces_pb2.ListProviderTracesRequest | None = None,
    *,
    metadata: Metadata = None,
    timeout: float = 10.0,
) -> list[traces_pb2.ProviderTrace]:
    """`list_all` once it holds at least `count` traces."""
    deadline = time.monotonic() + timeout
    while True:
        traces = await list_all(stub, request, metadata=metadata)
        if len(traces) >= count:
            return traces
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(traces)} traces after {timeout}s, expected {count}")
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], bool], *, timeout: float = 10.0, message: str = "") -> None:
    """Poll a synchronous condition until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met after {timeout}s")
        await asyncio.sleep(0.02)
