"""The gateway's one error hierarchy.

Every failure the gateway reports is a `GatewayError`. Each subclass fixes the gRPC status code
and the `ErrorInfo.reason` of one row of the contract's status table, so the mapping to gRPC
(`server.api.status`) is exhaustive by construction:

    GatewayError
    ├── ContextWindowExceeded      INVALID_ARGUMENT     CONTEXT_WINDOW_EXCEEDED
    ├── InvalidRequest             INVALID_ARGUMENT     INVALID_REQUEST  (+ BadRequest)
    ├── MissingApiKey              FAILED_PRECONDITION  MISSING_API_KEY
    ├── RateLimitExceeded          RESOURCE_EXHAUSTED   RATE_LIMIT_EXCEEDED  (+ RetryInfo)
    ├── UpstreamRejected           INVALID_ARGUMENT     UPSTREAM_REJECTED
    ├── UpstreamAuthFailed         FAILED_PRECONDITION  UPSTREAM_AUTH_FAILED
    ├── ModelNotFound              NOT_FOUND            MODEL_NOT_FOUND
    ├── UpstreamUnavailable        UNAVAILABLE          UPSTREAM_UNAVAILABLE  (+ RetryInfo)
    ├── UpstreamBadResponse        UNAVAILABLE          UPSTREAM_BAD_RESPONSE
    ├── UnparseableModelOutput     UNAVAILABLE          UNPARSEABLE_MODEL_OUTPUT
    ├── ToolCallMissing            UNAVAILABLE          TOOL_CALL_MISSING
    ├── DeadlineExceeded           DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
    ├── ShuttingDown               UNAVAILABLE          SHUTTING_DOWN
    ├── InternalTimeout            UNAVAILABLE          INTERNAL_TIMEOUT
    ├── QuotaExceeded              RESOURCE_EXHAUSTED   QUOTA_EXCEEDED  (+ QuotaFailure, RetryInfo)
    ├── LimitsUnavailable          UNAVAILABLE          LIMITS_UNAVAILABLE  (+ RetryInfo)
    ├── Unauthenticated            UNAUTHENTICATED      UNAUTHENTICATED
    ├── EndpointNotAllowed         PERMISSION_DENIED    ENDPOINT_NOT_ALLOWED
    ├── PermissionDenied           PERMISSION_DENIED    PERMISSION_DENIED
    ├── NotFound                   NOT_FOUND            NOT_FOUND
    ├── FailedPrecondition         FAILED_PRECONDITION  FAILED_PRECONDITION
    ├── AlreadyExists              ALREADY_EXISTS       ALREADY_EXISTS
    └── Unimplemented              UNIMPLEMENTED        UNIMPLEMENTED

Lower layers (HTTP client, drivers, JSON) are translated into these at the boundary with
`raise ... from exc`. Messages and metadata must never carry a secret: callers pass values
through `server.auth.redact` when they may contain one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request, for `google.rpc.BadRequest`."""

    field: str
    description: str


class GatewayError(Exception):
    """A failure with its gRPC status, `ErrorInfo` reason and machine-readable details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    # What the upstream answered with the error status, scrubbed and bounded, for the trace's
    # response_json (set by `server.providers.errors.keep_error_body`); never sent to the caller.
    trace_body: str = ""
    # Set by `server.providers.errors.error_in_body` when the error object's mapping says a retry
    # cannot help (a request alone over the per-minute token limit, a used-up quota): a stream's
    # first `error` event is retried by its type only when this is False.
    final: bool = False
    # The upstream's own retry hint (seconds) of an error that came inside a 200 (an SSE error
    # event: Gemini's RetryInfo), for the retry loop when nothing was relayed yet; None without one.
    upstream_retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, object] | None = None,
        retry_delay: float | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        # ErrorInfo metadata is map<string, string>: stringify once here.
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_delay = retry_delay
        self.field_violations = tuple(field_violations)


class ContextWindowExceeded(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "CONTEXT_WINDOW_EXCEEDED"


class InvalidRequest(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class MissingApiKey(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MISSING_API_KEY"


class RateLimitExceeded(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMIT_EXCEEDED"


class UpstreamRejected(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "UPSTREAM_REJECTED"


class UpstreamAuthFailed(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UPSTREAM_AUTH_FAILED"


class ModelNotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class UpstreamUnavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_UNAVAILABLE"


class UpstreamBadResponse(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_BAD_RESPONSE"


class UnparseableModelOutput(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNPARSEABLE_MODEL_OUTPUT"


class ToolCallMissing(GatewayError):
    """A required or forced tool call answered without one (`server.core.tool_call_check`)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "TOOL_CALL_MISSING"


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ShuttingDown(GatewayError):
    """The gateway is stopping: the call was cut at the end of the grace period, or came too late.

    UNAVAILABLE, as gRPC means it: transient, retry (another instance answers). Not
    UPSTREAM_UNAVAILABLE: the upstream did nothing wrong, and alerts on it must not fire.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class InternalTimeout(GatewayError):
    """Something inside the gateway timed out (a database pool, the key store, a lock).

    Not DEADLINE_EXCEEDED: only the caller's own deadline passing may say that. UNAVAILABLE
    because a busy pool or a slow store is transient; metadata says what timed out.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "INTERNAL_TIMEOUT"


class QuotaExceeded(GatewayError):
    """A gateway limit or budget (server.limits) refused the call before anything went upstream.

    `quota_violations` are (subject, description) pairs for `google.rpc.QuotaFailure`; the
    subject names the limit ("key:<id>:requests_per_minute").
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, object] | None = None,
        retry_delay: float | None = None,
        quota_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message, metadata=metadata, retry_delay=retry_delay)
        self.quota_violations = tuple(quota_violations)


class LimitsUnavailable(GatewayError):
    """The shared limit counters (Redis) cannot be reached and the policy is to fail closed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "LIMITS_UNAVAILABLE"


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class EndpointNotAllowed(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ENDPOINT_NOT_ALLOWED"


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class AlreadyExists(GatewayError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"
