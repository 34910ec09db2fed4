"""Helpers for the error-model tests: decode rich status details, call RPCs with raw bytes.

(Named like a test module so it sits with the tests it serves; it defines no tests.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "llmgateway"

CHAT = "/llmgateway.v1.ChatCompletionService/"
TRACES = "/llmgateway.v1.ProviderTraceService/"
PROVIDERS = "/llmgateway.v1.ProviderService/"
EVERY_RPC = (
    CHAT + "Create",
    CHAT + "StreamCreate",
    CHAT + "CountTokens",
    TRACES + "GetProviderTrace",
    TRACES + "ListProviderTraces",
    PROVIDERS + "CreateProvider",
    PROVIDERS + "ListProviders",
    PROVIDERS + "DeleteProvider",
)


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    error_infos: list[error_details_pb2.ErrorInfo] = field(default_factory=list)
    retry_infos: list[error_details_pb2.RetryInfo] = field(default_factory=list)
    bad_requests: list[error_details_pb2.BadRequest] = field(default_factory=list)
    quota_failures: list[error_details_pb2.QuotaFailure] = field(default_factory=list)

    @property
    def info(self) -> error_details_pb2.ErrorInfo:
        assert len(self.error_infos) == 1, self.error_infos
        return self.error_infos[0]

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata)

    @property
    def retry_delay(self) -> float | None:
        if not self.retry_infos:
            return None
        assert len(self.retry_infos) == 1
        d = self.retry_infos[0].retry_delay
        return d.seconds + d.nanos / 1e9

    @property
    def violations(self) -> dict[str, str]:
        assert len(self.bad_requests) == 1, self.bad_requests
        return {v.field: v.description for v in self.bad_requests[0].field_violations}

    def text(self) -> str:
        """Everything the client can read of the error (for leak checks)."""
        return self.message + "\n" + str(self.status) + "\n" + repr(self.status.SerializeToString())


def details(err: grpc.aio.AioRpcError) -> Details:
    """The rich status of a failed call; asserts it is well-formed (exactly one ErrorInfo)."""
    trailers = err.trailing_metadata() or ()
    raw = [value for key, value in trailers if key == DETAILS_KEY]
    assert len(raw) == 1, f"no {DETAILS_KEY} in {trailers!r} ({err.code()}: {err.details()})"
    status = status_pb2.Status.FromString(raw[0])
    assert status.code == err.code().value[0], (status.code, err.code())
    assert status.message == err.details(), (status.message, err.details())
    out = Details(err.code(), err.details() or "", status)
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            out.error_infos.append(info)
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_.Unpack(retry)
            out.retry_infos.append(retry)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_.Unpack(bad)
            out.bad_requests.append(bad)
        elif any_.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            any_.Unpack(quota)
            out.quota_failures.append(quota)
        else:
            raise AssertionError(f"unexpected detail {any_.type_url}")
    assert len(out.error_infos) == 1, out.error_infos
    assert out.info.domain == DOMAIN
    assert out.info.reason and out.info.reason == out.info.reason.upper()
    return out


def expect(err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> Details:
    d = details(err)
    assert (d.code, d.reason) == (code, reason), (d.code, d.reason, d.message)
    return d


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(answer.status)


async def assert_serving(channel: grpc.aio.Channel) -> None:
    for service in ("", "llmgateway.v1.ChatCompletionService"):
        assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING


async def call_raw(
    channel: grpc.aio.Channel, method: str, data: bytes, *, timeout: float = 20.0
) -> list[bytes]:
    """Send raw bytes to a method; the raw answers (one for unary, all messages for streams)."""
    if method.endswith("/StreamCreate"):
        stream = channel.unary_stream(method)
        return [m async for m in stream(data, timeout=timeout)]
    unary = channel.unary_unary(method)
    return [await unary(data, timeout=timeout)]


async def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate()` until true or the timeout; the last value."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        if predicate():
            return True
        if loop.time() > end:
            return bool(predicate())
        await asyncio.sleep(interval)
