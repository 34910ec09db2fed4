"""Per-call helpers shared by the servicers: parsing, deadline, actor, error mapping."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from server.api.status import abort
from server.api.struct_bound import oversized_structs
from server.auth.actor import Actor
from server.core.retry import Deadline
from server.core.validation import undecodable
from server.errors import DeadlineExceeded, FieldViolation, GatewayError, InternalTimeout, InvalidRequest

log = logging.getLogger("llmgateway.api")
M = TypeVar("M", bound=Message)
Context: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg, unused-ignore]


class Authenticator(Protocol):
    async def actor_for(self, context: Context) -> Actor: ...


def parse(message_type: type[M], data: bytes) -> M:
    """Decode request bytes; grpc.aio's own decoding would answer UNKNOWN on garbage.

    Well-known types that decode but hold impossible values (a Timestamp before year 1 or with
    negative nanos) are refused here too, so no servicer trips over them later.
    """
    message = message_type()
    try:
        # Before decoding: a huge JSON object took the decoder seconds, the loop held; bytes the
        # check cannot decode do not decode as the real type either (struct_bound).
        oversized = oversized_structs(message_type, data)
        if not oversized:
            message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise undecodable(message_type.DESCRIPTOR.full_name, data, exc) from exc
    if oversized:
        raise InvalidRequest(
            f"invalid request: {oversized[0].field}: {oversized[0].description}",
            metadata={"fields": ",".join(v.field for v in oversized)},
            field_violations=oversized,
        )
    if not _has_timestamps(message_type):  # CreateRequest has none: no walk
        return message
    violations = list(_bad_timestamps(message, ""))
    if violations:
        raise InvalidRequest(
            f"invalid request: {violations[0].field}: {violations[0].description}",
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )
    return message


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_TIMESTAMP = "google.protobuf.Timestamp"


# Message class -> whether it can hold a Timestamp; keyed by the class (one lookup, no descriptor
# fetched per call) and bounded by the servicers' few request types.
_HAS_TIMESTAMPS: dict[type[Message], bool] = {}


def _has_timestamps(message_type: type[Message]) -> bool:
    has = _HAS_TIMESTAMPS.get(message_type)
    if has is None:
        has = _HAS_TIMESTAMPS[message_type] = bool(_timestamp_fields(message_type.DESCRIPTOR))
    return has


@functools.cache
def _timestamp_fields(descriptor: Descriptor) -> tuple[tuple[str, bool], ...]:
    """(field name, is Timestamp itself) for the singular message fields that hold a Timestamp."""
    out = []
    for field in descriptor.fields:
        if field.message_type is None or field.is_repeated:
            continue
        if field.message_type.full_name == _TIMESTAMP:
            out.append((field.name, True))
        elif field.message_type is not descriptor and _timestamp_fields(field.message_type):
            out.append((field.name, False))
    return tuple(out)


def _bad_timestamps(message: Message, prefix: str) -> Iterator[FieldViolation]:
    for name, is_timestamp in _timestamp_fields(message.DESCRIPTOR):
        if not message.HasField(name):
            continue
        value = getattr(message, name)
        if not is_timestamp:
            yield from _bad_timestamps(value, f"{prefix}{name}.")
        elif not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos <= 999_999_999):
            yield FieldViolation(
                f"{prefix}{name}", "not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"
            )


# A call without a deadline gets this one: a Deadline is frozen (a value), so one serves them all
# (building one, a frozen dataclass, cost ~2,500 instructions a call).
_NO_DEADLINE = Deadline(None)


def deadline_of(context: Context) -> Deadline:
    remaining = context.time_remaining()
    if remaining is None or remaining > 10**8:  # grpc reports "infinite" as a huge number
        return _NO_DEADLINE
    return Deadline.after(remaining)


def map_exception(exc: Exception, where: str, context: Context | None = None) -> GatewayError:
    """The status for a failure that escaped a servicer (an unexpected one is INTERNAL, logged)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, TimeoutError):
        # Only the caller's own deadline is DEADLINE_EXCEEDED; a pool, a store or a lock timing
        # out says what it was, so callers and operators do not chase the wrong clock.
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            return DeadlineExceeded("the caller's deadline passed")
        operation = _timed_out_operation(exc)
        log.warning("%s timed out inside %s", operation, where, exc_info=exc)
        return InternalTimeout(
            f"an internal operation timed out ({operation}), not the caller's deadline; see the gateway log",
            metadata={"rpc": where, "operation": operation},
        )
    log.exception("unexpected failure in %s", where)
    return GatewayError("internal error; see the gateway log", metadata={"rpc": where})


def _timed_out_operation(exc: BaseException) -> str:
    """Where a TimeoutError came from: the innermost frame outside asyncio (module.function)."""
    found = "unknown"
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module and not module.startswith(("asyncio", "contextlib")):
            found = f"{module}.{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return found


async def run_unary(context: Context, call: Callable[[], Awaitable[M]]) -> M:
    """Run one unary call, mapping every failure to its status (an unexpected one to INTERNAL)."""
    try:
        return await call()
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: answer, log, stay up
        error = map_exception(
            exc, getattr(call, "__qualname__", "call").removesuffix(".<locals>.call"), context
        )
    try:
        await abort(context, error)
    finally:
        # The error's traceback holds this frame: kept in its locals, that is a cycle (error ->
        # traceback -> frame -> error) with the failed call's state, left to the collector.
        del error
    raise AssertionError("unreachable: abort raises")
