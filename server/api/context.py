"""Per-call helpers shared by the servicers: parsing, deadline, actor, error mapping."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from server.api.status import abort
from server.auth.actor import Actor
from server.core.retry import Deadline
from server.errors import DeadlineExceeded, GatewayError, InvalidRequest

log = logging.getLogger("llmgateway.api")
M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext  # type: ignore[type-arg]


class Authenticator(Protocol):
    async def actor_for(self, context: Context) -> Actor: ...


def parse(message_type: type[M], data: bytes) -> M:
    """Decode request bytes; grpc.aio's own decoding would answer UNKNOWN on garbage."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidRequest(
            f"the request is not a valid {message_type.DESCRIPTOR.full_name}",
            metadata={"message_type": message_type.DESCRIPTOR.full_name, "bytes": len(data)},
        ) from exc
    return message


def deadline_of(context: Context) -> Deadline:
    remaining = context.time_remaining()
    if remaining is not None and remaining > 10**8:  # grpc reports "infinite" as a huge number
        remaining = None
    return Deadline.after(remaining)


async def run_unary(context: Context, call: Callable[[], Awaitable[M]]) -> M:
    """Run one unary call, mapping every failure to its status (an unexpected one to INTERNAL)."""
    try:
        return await call()
    except GatewayError as error:
        await abort(context, error)
    except TimeoutError:
        await abort(context, DeadlineExceeded("the caller's deadline passed"))
    except Exception:  # noqa: BLE001 - the last line of defence: log it, answer INTERNAL, stay up
        log.exception("unexpected failure in %s", type(call).__name__)
        await abort(context, GatewayError("internal error; see the gateway log"))
    raise AssertionError("unreachable: abort raises")
