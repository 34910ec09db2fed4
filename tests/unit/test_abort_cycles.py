"""A call that fails is freed by reference counting, not left for the cyclic collector.

run_unary and StreamCreate map a failure to its status and abort the call outside the `except`
(no AbortError chained to it). The mapped error was kept in a local of the frame its traceback
passed through: error -> traceback -> frame -> error, a cycle per failed call (holding the
request and everything the failing frames reference) that only a collection frees. These run
with the collector off: a weak reference to the error says whether a cycle keeps it.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import grpc

from server.api.chat import ChatCompletionServicer
from server.api.context import Authenticator, run_unary
from server.api.handlers import Service
from server.api.status import abort
from server.errors import GatewayError, UpstreamUnavailable
from server.gateway import Gateway
from server.inflight import InFlight
from tests.gc_helpers import collector_off


class _Context:
    """What grpc's servicer context does here: abort raises AbortError."""

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        raise grpc.aio.AbortError("Locally aborted.")

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def _failure(errors: list[weakref.ref[GatewayError]]) -> GatewayError:
    # Made here, raised by the caller without a local of its own (which would be a cycle too).
    error = UpstreamUnavailable("the upstream failed")
    errors.append(weakref.ref(error))
    return error


class _FailingAuth:
    def __init__(self, errors: list[weakref.ref[GatewayError]]) -> None:
        self._errors = errors

    async def actor_for(self, context: Any) -> Any:
        raise _failure(self._errors)


async def _aborted(awaitable: Awaitable[object]) -> None:
    # Not pytest.raises: its ExceptionInfo would keep the AbortError (and its frames) alive.
    try:
        await awaitable
    except grpc.aio.AbortError:
        return
    raise AssertionError("the call was not aborted")


async def test_a_failed_unary_call_leaves_no_cycle() -> None:
    errors: list[weakref.ref[GatewayError]] = []

    async def call() -> None:
        raise _failure(errors)

    with collector_off():
        await _aborted(run_unary(cast(Any, _Context()), call))
        assert errors[0]() is None, "the failed call's error is kept alive by a cycle"


async def test_a_failed_stream_leaves_no_cycle() -> None:
    errors: list[weakref.ref[GatewayError]] = []
    servicer = ChatCompletionServicer(cast(Gateway, None), cast(Authenticator, _FailingAuth(errors)))

    async def consume() -> None:
        async for _ in servicer.stream_create(b"", cast(Any, _Context())):
            pass

    with collector_off():
        await _aborted(consume())
        assert errors[0]() is None, "the failed stream's error is kept alive by a cycle"


class _PassingAuth:
    async def actor_for(self, context: Any) -> Any:
        return object()


class _FailingGateway:
    """A stream that relays one delta, then fails (after the caller saw part of the answer)."""

    def __init__(self, errors: list[weakref.ref[GatewayError]]) -> None:
        self._errors = errors

    async def _events(self) -> AsyncIterator[bytes]:
        yield b"delta"
        raise _failure(self._errors)

    def stream_wire(self, request: Any, actor: Any, deadline: Any) -> AsyncIterator[bytes]:
        return self._events()


def _tracked_stream_create(servicer: ChatCompletionServicer) -> Any:
    # As the server runs it: the handler after InFlight.track, i.e. the servicer's parts run by
    # InFlight.stream's own generator (no servicer generator around the gateway's).
    handlers = servicer.handlers()
    assert isinstance(handlers, Service)
    handlers.track(InFlight(abort))
    return handlers._handlers["/llmgateway.v1.ChatCompletionService/StreamCreate"].unary_stream


async def test_a_tracked_stream_failing_in_its_head_leaves_no_cycle() -> None:
    errors: list[weakref.ref[GatewayError]] = []
    servicer = ChatCompletionServicer(cast(Gateway, None), cast(Authenticator, _FailingAuth(errors)))
    behaviour = _tracked_stream_create(servicer)

    async def consume() -> None:
        async for _ in behaviour(b"", cast(Any, _Context())):
            pass

    with collector_off():
        await _aborted(consume())
        assert errors[0]() is None, "the failed stream's error is kept alive by a cycle"


async def test_a_tracked_stream_failing_after_a_delta_ends_aborted_and_leaves_no_cycle() -> None:
    errors: list[weakref.ref[GatewayError]] = []
    servicer = ChatCompletionServicer(
        cast(Gateway, _FailingGateway(errors)), cast(Authenticator, _PassingAuth())
    )
    behaviour = _tracked_stream_create(servicer)
    received: list[object] = []

    async def consume() -> None:
        async for message in behaviour(b"", cast(Any, _Context())):
            received.append(message)

    with collector_off():
        await _aborted(consume())  # the failure's status, not a stream that ends OK
        assert received == [b"delta"]
        assert errors[0]() is None, "the failed stream's error is kept alive by a cycle"


async def test_a_failed_create_leaves_no_cycle() -> None:
    # Create writes run_unary out (no closure, one coroutine layer fewer): the same care.
    errors: list[weakref.ref[GatewayError]] = []
    servicer = ChatCompletionServicer(cast(Gateway, None), cast(Authenticator, _FailingAuth(errors)))
    with collector_off():
        await _aborted(servicer.create(b"", cast(Any, _Context())))
        assert errors[0]() is None, "the failed call's error is kept alive by a cycle"


class _RecordingContext(_Context):
    def __init__(self) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str, Any]] = []

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.aborts.append((code, details, tuple(trailing_metadata)))
        raise grpc.aio.AbortError("Locally aborted.")


class _RaisingAuth:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def actor_for(self, context: Any) -> Any:
        raise self.exc


async def test_create_fails_as_run_unary_does() -> None:
    """Create's written-out `run_unary` aborts with what run_unary gives the same failure: an
    unexpected one as INTERNAL naming the RPC, a GatewayError as itself; an AbortError goes on."""
    for exc in (RuntimeError("boom"), UpstreamUnavailable("the upstream failed"), KeyError("k")):
        direct, reference = _RecordingContext(), _RecordingContext()
        servicer = ChatCompletionServicer(cast(Gateway, None), cast(Authenticator, _RaisingAuth(exc)))
        await _aborted(servicer.create(b"", cast(Any, direct)))

        async def call(exc: BaseException = exc) -> None:
            raise exc

        call.__qualname__ = "ChatCompletionServicer.create.<locals>.call"  # as the closure was
        await _aborted(run_unary(cast(Any, reference), call))
        assert direct.aborts == reference.aborts and len(direct.aborts) == 1, exc
    aborted = _RecordingContext()
    servicer = ChatCompletionServicer(
        cast(Gateway, None), cast(Authenticator, _RaisingAuth(grpc.aio.AbortError("already")))
    )
    await _aborted(servicer.create(b"", cast(Any, aborted)))
    assert aborted.aborts == []  # re-raised as it is, never aborted again


class _RemainingContext(_RecordingContext):
    def __init__(self, remaining: float | None) -> None:
        super().__init__()
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


async def test_create_maps_a_timeout_as_run_unary_does_by_the_callers_deadline() -> None:
    """A TimeoutError is mapped by the context's deadline: DEADLINE_EXCEEDED once it passed,
    else INTERNAL_TIMEOUT naming the operation (the innermost frame, here the authenticator's).
    Create must hand map_exception its context, as run_unary does."""
    for remaining, code in ((-1.0, grpc.StatusCode.DEADLINE_EXCEEDED), (None, grpc.StatusCode.UNAVAILABLE)):
        auth = _RaisingAuth(TimeoutError())
        direct, reference = _RemainingContext(remaining), _RemainingContext(remaining)
        servicer = ChatCompletionServicer(cast(Gateway, None), cast(Authenticator, auth))
        await _aborted(servicer.create(b"", cast(Any, direct)))

        async def call(auth: _RaisingAuth = auth, context: Any = reference) -> None:
            await auth.actor_for(context)  # the same innermost frame as Create's

        call.__qualname__ = "ChatCompletionServicer.create.<locals>.call"  # as the closure was
        await _aborted(run_unary(cast(Any, reference), call))
        assert direct.aborts == reference.aborts and len(direct.aborts) == 1, remaining
        assert direct.aborts[0][0] == code, direct.aborts
