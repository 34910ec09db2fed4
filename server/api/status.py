"""The one mapping from gateway errors to gRPC statuses with rich details.

Every non-OK status carries a `google.rpc.Status` in the `grpc-status-details-bin` trailer with
exactly one `ErrorInfo` (domain "llmgateway"), plus `RetryInfo` when waiting helps and
`BadRequest` for field violations.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from server.errors import GatewayError

DOMAIN = "llmgateway"
_DETAILS_KEY = "grpc-status-details-bin"


def to_status_proto(error: GatewayError) -> status_pb2.Status:
    """Build the `google.rpc.Status` for an error (code, message, details)."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    _pack(status, info)
    if error.retry_delay is not None:
        delay = max(0.0, error.retry_delay)
        seconds = math.floor(delay)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((delay - seconds) * 1e9))
        )
        _pack(status, retry)
    if error.field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.field_violations
            ]
        )
        _pack(status, bad)
    return status


def _pack(status: status_pb2.Status, detail: object) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type]
    status.details.append(packed)


def trailing_metadata(error: GatewayError) -> tuple[tuple[str, bytes], ...]:
    return ((_DETAILS_KEY, to_status_proto(error).SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, error: GatewayError) -> None:  # type: ignore[type-arg]
    """End the call with the error's status; never returns."""
    await context.abort(error.code, error.message, trailing_metadata(error))
