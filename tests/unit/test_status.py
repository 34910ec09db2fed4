"""Gateway errors as google.rpc.Status: one ErrorInfo, RetryInfo and BadRequest where due, bounded."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from server import errors
from server.api.status import DOMAIN, MAX_MESSAGE_BYTES, status_message, to_status_proto, trailing_metadata
from server.errors import FieldViolation, GatewayError

# (class, code, reason) for every row of the contract's table (and the extra classes).
TABLE = [
    (errors.ContextWindowExceeded, grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED"),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    (errors.MissingApiKey, grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY"),
    (errors.RateLimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED"),
    (errors.UpstreamRejected, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
    (errors.UpstreamAuthFailed, grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED"),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    (errors.UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    (errors.UpstreamBadResponse, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE"),
    (errors.UnparseableModelOutput, grpc.StatusCode.UNAVAILABLE, "UNPARSEABLE_MODEL_OUTPUT"),
    (errors.ToolCallMissing, grpc.StatusCode.UNAVAILABLE, "TOOL_CALL_MISSING"),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"),
    (errors.LimitsUnavailable, grpc.StatusCode.UNAVAILABLE, "LIMITS_UNAVAILABLE"),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (errors.InternalTimeout, grpc.StatusCode.UNAVAILABLE, "INTERNAL_TIMEOUT"),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (errors.EndpointNotAllowed, grpc.StatusCode.PERMISSION_DENIED, "ENDPOINT_NOT_ALLOWED"),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED"),
]


def unpack(status: status_pb2.Status) -> tuple[list[object], list[object], list[object]]:
    infos: list[object] = []
    retries: list[object] = []
    bads: list[object] = []
    for detail in status.details:
        for cls, bucket in (
            (error_details_pb2.ErrorInfo, infos),
            (error_details_pb2.RetryInfo, retries),
            (error_details_pb2.BadRequest, bads),
        ):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                bucket.append(message)
                break
        else:
            raise AssertionError(detail.type_url)
    return infos, retries, bads


def test_every_gateway_error_class_is_in_the_table() -> None:
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, GatewayError)}
    assert classes - {GatewayError} == {cls for cls, _, _ in TABLE}


@pytest.mark.parametrize(("cls", "code", "reason"), TABLE)
def test_each_row_has_exactly_one_error_info(
    cls: type[GatewayError], code: grpc.StatusCode, reason: str
) -> None:
    error = cls("something went wrong with model x", metadata={"model": "x", "count": 3})
    assert (error.code, error.reason) == (code, reason)
    status = to_status_proto(error)
    assert status.code == code.value[0]
    assert status.message == "something went wrong with model x"
    infos, retries, bads = unpack(status)
    assert len(infos) == 1 and not retries and not bads
    info = infos[0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason, dict(info.metadata)) == (DOMAIN, reason, {"model": "x", "count": "3"})


def test_retry_info_when_a_delay_is_known() -> None:
    status = to_status_proto(errors.RateLimitExceeded("slow down", retry_delay=2.25))
    _, retries, _ = unpack(status)
    (retry,) = retries
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (2, 250_000_000)


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), -3.0, 1e30])
def test_absurd_retry_delays_are_clamped(delay: float) -> None:
    _, (retry,), _ = unpack(to_status_proto(errors.UpstreamUnavailable("x", retry_delay=delay)))
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert 0 <= retry.retry_delay.seconds <= 24 * 3600


def test_bad_request_lists_the_field_violations() -> None:
    error = errors.InvalidRequest(
        "invalid",
        field_violations=[FieldViolation("messages", "required"), FieldViolation("llm_config.model", "x")],
    )
    _, _, (bad,) = unpack(to_status_proto(error))
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("messages", "required"),
        ("llm_config.model", "x"),
    ]


def test_trailer_carries_the_serialized_status() -> None:
    error = errors.ModelNotFound("no such model", metadata={"model": "m"})
    ((key, value),) = trailing_metadata(error)
    assert key == "grpc-status-details-bin"
    assert status_pb2.Status.FromString(value) == to_status_proto(error)


@given(
    message=st.text(max_size=5000),
    metadata=st.dictionaries(st.text(max_size=300), st.text(max_size=3000), max_size=60),
    violations=st.lists(st.tuples(st.text(max_size=500), st.text(max_size=2000)), max_size=300),
    delay=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_status_is_always_bounded_and_well_formed(
    message: str, metadata: dict[str, str], violations: list[tuple[str, str]], delay: float | None
) -> None:
    error = errors.InvalidRequest(
        message,
        metadata=metadata,
        retry_delay=delay,
        field_violations=[FieldViolation(f, d) for f, d in violations],
    )
    status = to_status_proto(error)
    assert status.message == status_message(error)
    assert len(status.message.encode()) <= MAX_MESSAGE_BYTES
    # message (percent-encoded, at most 3x) + details (base64, 4/3) stay far below 8 KiB
    assert len(status.SerializeToString()) - len(status.message.encode()) <= 2600
    infos, retries, bads = unpack(status)
    assert len(infos) == 1
    assert len(retries) == (delay is not None)
    assert len(bads) == (1 if violations else 0)
