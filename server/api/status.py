"""The one mapping from gateway errors to gRPC statuses with rich details.

Every non-OK status carries a `google.rpc.Status` in the `grpc-status-details-bin` trailer with
exactly one `ErrorInfo` (domain "llmgateway"), plus `RetryInfo` when waiting helps and
`BadRequest` for field violations.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from server.auth.redact import installed_redactor
from server.errors import GatewayError

DOMAIN = "llmgateway"
_DETAILS_KEY = "grpc-status-details-bin"


# Trailers must fit the client's metadata limit (8 KiB by default): grpc-message is
# percent-encoded (up to 3 bytes per byte) and the details are base64 (4/3), so both are bounded.
MAX_MESSAGE_BYTES = 768
MAX_DETAILS_BYTES = 2560
MAX_METADATA_ENTRIES = 24
MAX_METADATA_VALUE_BYTES = 256
MAX_VIOLATIONS = 25
MAX_VIOLATION_BYTES = 200
MAX_RETRY_DELAY = 24 * 3600.0


def _clip(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def status_message(error: GatewayError) -> str:
    """The message as sent (bounded); the same text goes in grpc-message and in the Status."""
    return _clip(error.message, MAX_MESSAGE_BYTES) or error.reason


def _retry_delay(value: float) -> duration_pb2.Duration:
    delay = value if math.isfinite(value) else MAX_RETRY_DELAY
    delay = min(MAX_RETRY_DELAY, max(0.0, delay))
    seconds = math.floor(delay)
    return duration_pb2.Duration(seconds=seconds, nanos=min(999_999_999, int((delay - seconds) * 1e9)))


def to_status_proto(error: GatewayError) -> status_pb2.Status:
    """Build the `google.rpc.Status` for an error (code, message, details), bounded in size."""
    metadata = {
        _clip(k, 64): _clip(v, MAX_METADATA_VALUE_BYTES)
        for k, v in list(error.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, MAX_VIOLATION_BYTES), description=_clip(v.description, MAX_VIOLATION_BYTES)
        )
        for v in error.field_violations[:MAX_VIOLATIONS]
    ]
    while True:
        status = _build(error, metadata, violations)
        if status.ByteSize() - len(status.message.encode()) <= MAX_DETAILS_BYTES:
            return status
        if len(violations) > 1:
            violations = violations[: len(violations) // 2]
        elif any(len(v) > 32 for v in metadata.values()):
            metadata = {k: _clip(v, 32) for k, v in metadata.items()}
        elif len(metadata) > 4:
            metadata = dict(list(metadata.items())[: len(metadata) // 2])
        else:
            return status


def _build(
    error: GatewayError,
    metadata: dict[str, str],
    violations: list[error_details_pb2.BadRequest.FieldViolation],
) -> status_pb2.Status:
    status = status_pb2.Status(code=error.code.value[0], message=status_message(error))
    _pack(status, error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))
    if error.retry_delay is not None:
        _pack(status, error_details_pb2.RetryInfo(retry_delay=_retry_delay(error.retry_delay)))
    if violations:
        _pack(status, error_details_pb2.BadRequest(field_violations=violations))
    quota = getattr(error, "quota_violations", ())  # QuotaExceeded: which limit refused the call
    if quota:
        _pack(
            status,
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=_clip(subject, MAX_VIOLATION_BYTES),
                        description=_clip(text, MAX_VIOLATION_BYTES),
                    )
                    for subject, text in quota[:MAX_VIOLATIONS]
                ]
            ),
        )
    return status


def _pack(status: status_pb2.Status, detail: object) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type, unused-ignore]
    status.details.append(packed)


def trailing_metadata(error: GatewayError) -> tuple[tuple[str, bytes], ...]:
    return ((_DETAILS_KEY, to_status_proto(error).SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, error: GatewayError) -> None:  # type: ignore[type-arg, unused-ignore]
    """End the call with the error's status; never returns."""
    redactor = installed_redactor()
    if redactor is not None:
        # The last door before the caller: no known secret or key-shaped value leaves in an error.
        redactor.redact_error(error)
    await context.abort(error.code, status_message(error), trailing_metadata(error))
