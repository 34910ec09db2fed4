"""The calls in flight: shutdown drains them, cuts the ones the grace period could not finish,
and every trace can say why its call was cancelled (the caller, its deadline, or shutdown).

grpc.aio's own `server.stop(grace)` is not enough on its own:
- It stops handing calls to handlers at once, and grpc core then cancels the calls that had
  already arrived but were still queued for a handler: the caller gets a bare CANCELLED for a
  call the gateway never looked at. `InFlight.settle` lets that queue drain first.
- At the end of the grace period it cancels every call in core, so a stream still running ends
  with a bare status (or looks complete), and its handler unwinds only after `stop()` returned,
  when the trace writer may be closed. `InFlight.cut` ends them first, from the inside, with
  UNAVAILABLE SHUTTING_DOWN, while grpc still sends a status; `wait_idle` waits for their traces.

`InFlight.unary` / `InFlight.stream` wrap a servicer method; `current_call()` is the call the
running task is handling (a ContextVar, so the request path needs no extra argument).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, runtime_checkable

import grpc

from server.errors import GatewayError, ShuttingDown
from server.running_loop import RunningLoop

Context: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg, unused-ignore]
R = TypeVar("R")
Aborter = Callable[[Context, GatewayError], Awaitable[None]]
log = logging.getLogger("llmgateway.inflight")

# Trace error types of a cancelled call (the same words as the statuses the caller sees).
CANCELLED_BY_SHUTDOWN = ("SHUTTING_DOWN", "cancelled by shutdown: still running when the grace period ended")
CANCELLED_BY_DEADLINE = ("DEADLINE_EXCEEDED", "the caller's deadline passed")
CANCELLED_BY_CALLER = ("CANCELLED", "the caller cancelled the call")
SETTLE_PROBE = 0.02


# A cancellation this close to the caller's deadline is the deadline (see deadline_passed).
DEADLINE_SLACK = 0.5


class InFlightCall:
    """One call being handled: its task and context, and whether shutdown cut it."""

    __slots__ = ("task", "context", "cut", "ended_by_cut", "running")

    def __init__(self, task: asyncio.Task[Any] | None, context: Context) -> None:
        self.task = task
        self.context = context
        self.cut = False  # shutdown ended it, or marked it to end (set before its task is cancelled)
        # Shutdown itself ends it: its task cancelled by the cut, or its stream stopped by
        # `tracked` once the message grpc was writing went out. A stream only marked stays
        # False while grpc's write does not return: grpc then ends it (its deadline, its caller,
        # or grpc's own stop).
        self.ended_by_cut = False
        self.running = True  # in the servicer's code (not in grpc's write of a stream message)

    def deadline_passed(self) -> bool:
        # The client's clock runs out first: the server counts the deadline from when it read the
        # request's headers, so a client that cancels at its own deadline (RST_STREAM) reaches us
        # while a little time seems left here; under load that gap is tens of milliseconds.
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= DEADLINE_SLACK


_CURRENT: ContextVar[InFlightCall | None] = ContextVar("llmgateway_call", default=None)


def current_call() -> InFlightCall | None:
    """The call the running task is handling (None outside a tracked servicer method)."""
    return _CURRENT.get()


def cancel_cause(call: InFlightCall | None) -> tuple[str, str]:
    """(error_type, error_message) for the trace of a call that was cancelled."""
    if call is None:
        return CANCELLED_BY_CALLER
    if call.cut and call.ended_by_cut:
        return CANCELLED_BY_SHUTDOWN
    if call.deadline_passed():
        return CANCELLED_BY_DEADLINE  # also one the cut only marked, whose deadline grpc enforced
    if call.cut:
        return CANCELLED_BY_SHUTDOWN  # marked, then ended by grpc's own stop (UNAVAILABLE)
    return CANCELLED_BY_CALLER


def cancel_status(call: InFlightCall | None) -> str:
    """The gRPC status name the caller of a call that ended without one of ours receives: a call
    cut by shutdown ends with UNAVAILABLE (SHUTTING_DOWN, sent once its handler unwound), one
    whose deadline passed sees DEADLINE_EXCEEDED, one its caller cancelled CANCELLED."""
    error_type, _ = cancel_cause(call)
    return str(ShuttingDown.code.name) if error_type == ShuttingDown.reason else error_type


S = TypeVar("S")
R_co = TypeVar("R_co", covariant=True)


@runtime_checkable
class StreamParts(Protocol[S, R_co]):
    """A server-stream behaviour in parts, run by `InFlight.stream` in its own generator.

    `scope(context)` is entered around the call (after a drain's refusal); `open` runs the head
    (authenticate, parse) and returns the messages; `failure` maps an exception of the head or of
    the messages to the status the call ends with (None: it propagates as it is)."""

    def scope(self, context: Context) -> AbstractContextManager[S]: ...

    async def open(self, data: bytes, context: Context, scope: S) -> AsyncIterator[R_co]: ...

    def failure(self, exc: Exception, context: Context) -> GatewayError | None: ...


class _Plain(Generic[R]):
    """A plain generator function as `StreamParts`: no scope, its exceptions propagate."""

    __slots__ = ("_behaviour",)

    def __init__(self, behaviour: Callable[[bytes, Context], AsyncIterator[R]]) -> None:
        self._behaviour = behaviour

    def scope(self, context: Context) -> AbstractContextManager[None]:
        return nullcontext()

    async def open(self, data: bytes, context: Context, scope: None) -> AsyncIterator[R]:
        return self._behaviour(data, context)

    def failure(self, exc: Exception, context: Context) -> GatewayError | None:
        return None


class _Cut(Exception):
    """Inside `InFlight.stream`'s scope: shutdown cut the stream (raised to end the scope by an
    exception, as the servicer's own generator used to be closed)."""


class InFlight:
    """The registry of one server's calls in flight."""

    def __init__(self, abort: Aborter) -> None:
        self._abort = abort
        self._calls: set[InFlightCall] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._entered = 0  # calls ever handed to a handler (settle watches it move)
        self._last_entered = 0.0  # loop time of the latest one
        self._grace = 0.0
        self.closed = False  # draining or after the cut: a call arriving now is refused at once
        # Health checks and reflection refused (the drain began): a checker told so looks elsewhere.
        self.untracked_closed = False
        self.untracked = 0  # untracked calls ever admitted, and of those refused
        self.untracked_refused = 0
        self._loop = RunningLoop()

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def entered(self) -> int:
        """Calls ever handed to a handler."""
        return self._entered

    def _enter(self, context: Context) -> InFlightCall:
        # asyncio.get_running_loop() (and current_task() without a loop) makes a getpid()
        # system call on Python 3.11, on every call otherwise.
        loop = self._loop.get()
        call = InFlightCall(asyncio.current_task(loop), context)
        self._calls.add(call)
        self._entered += 1
        self._last_entered = loop.time()
        self._idle.clear()
        _CURRENT.set(call)  # the handler's task has its own context: this stays with the call
        return call

    def _leave(self, call: InFlightCall) -> None:
        # The call sits in its task's context (_CURRENT) and held the task: a reference cycle
        # (task -> context -> call -> task) that only the cyclic GC would free, with the grpc
        # context and everything else the call still references. Broken here, each call is
        # freed by reference counting the moment it ends.
        call.task = None
        self._calls.discard(call)
        if not self._calls:
            self._idle.set()

    def shutdown_error(self, *, refused: bool) -> ShuttingDown:
        if refused:
            return ShuttingDown(
                "the gateway is shutting down and takes no new calls; retry on another instance",
                metadata={"phase": "refused"},
            )
        return ShuttingDown(
            f"the gateway is shutting down: the call was still running when the {self._grace:g} s "
            "grace period ended; retry it",
            metadata={"phase": "cut", "grace_period_seconds": f"{self._grace:g}"},
        )

    def unary(
        self, behaviour: Callable[[bytes, Context], Awaitable[R]], refused: Callable[[], None] | None = None
    ) -> Callable[[bytes, Context], Awaitable[R]]:
        """`behaviour`, tracked: cut by shutdown, it ends with UNAVAILABLE SHUTTING_DOWN.
        `refused` is called for a call refused while draining (it never reaches `behaviour`)."""

        async def tracked(data: bytes, context: Context) -> R:
            call = self._enter(context)
            try:
                if self.closed:
                    call.running = False
                    if refused is not None:
                        refused()
                    await self._abort(context, self.shutdown_error(refused=True))
                try:
                    return await behaviour(data, context)
                except asyncio.CancelledError:
                    if not call.cut:
                        raise  # the caller went away or its deadline passed: nothing to send
                    uncancel_current()
                call.running = False
                await self._abort(context, self.shutdown_error(refused=False))
                raise AssertionError("unreachable: abort raises")
            finally:
                self._leave(call)

        return tracked

    def stream(
        self,
        behaviour: Callable[[bytes, Context], AsyncIterator[R]] | StreamParts[Any, R],
        refused: Callable[[], None] | None = None,
    ) -> Callable[[bytes, Context], AsyncIterator[R]]:
        """`behaviour` (a server stream), tracked: cut, it ends with UNAVAILABLE SHUTTING_DOWN.
        `refused` as for `unary`. A `StreamParts` behaviour runs inside this method's own
        generator (its scope, its head, its failure status): each message passes one generator
        layer fewer than through a servicer generator of its own."""
        parts: StreamParts[Any, R] = behaviour if isinstance(behaviour, StreamParts) else _Plain(behaviour)

        async def tracked(data: bytes, context: Context) -> AsyncIterator[R]:
            call = self._enter(context)
            try:
                if self.closed:
                    call.running = False
                    if refused is not None:
                        refused()
                    await self._abort(context, self.shutdown_error(refused=True))
                try:
                    with parts.scope(context) as scope:
                        messages: AsyncIterator[R] | None = None
                        error: GatewayError | None = None
                        try:
                            messages = await parts.open(data, context, scope)
                            while True:
                                if call.cut:
                                    call.ended_by_cut = True
                                    # Cut while grpc was writing our last message: if that was the
                                    # last one (the stream ends without waiting for anything), it is
                                    # complete and ends OK; else it is cut.
                                    if await _ends_now(messages):
                                        return
                                    raise _Cut  # the scope ends by an exception, as the call does
                                call.running = True
                                try:
                                    message = await anext(messages)
                                except StopAsyncIteration:
                                    return
                                finally:
                                    call.running = False
                                yield message
                        except (grpc.aio.AbortError, _Cut):
                            raise
                        except Exception as exc:  # noqa: BLE001 - the parts say its status (or raise)
                            error = parts.failure(exc, context)
                            if error is None:
                                raise
                        finally:
                            # Closing it unwinds the request path (its trace says SHUTTING_DOWN, as
                            # `cut` is set) before the status goes out; a no-op for one that ended.
                            if messages is not None:
                                aclose = getattr(messages, "aclose", None)
                                if aclose is not None:
                                    try:
                                        await aclose()
                                    except Exception:  # noqa: BLE001 - see below
                                        # Only one still open fails here (cut before its next
                                        # message, or closed as the caller left): logged, as the
                                        # loop's finalizer did when it closed it. The call ends as
                                        # it was ending: a cut one UNAVAILABLE SHUTTING_DOWN, not
                                        # this as an UNKNOWN its RequestScope did not count.
                                        log.exception("a stream's messages failed while closing")
                        # Aborted outside the `except`: no AbortError chained to the failure, whose
                        # traceback holds this frame (with `error` in it, a cycle).
                        call.running = True  # as in the head: a cut cancels the abort
                        try:
                            await self._abort(context, error)
                        finally:
                            del error
                        return  # (abort raises) the call ended there, as the servicer's generator did
                except asyncio.CancelledError:
                    if not call.cut:
                        raise  # the caller went away or its deadline passed: nothing to send
                    uncancel_current()
                except _Cut:
                    pass
                call.running = False
                await self._abort(context, self.shutdown_error(refused=False))
            finally:
                self._leave(call)

        return tracked

    async def settle(self, *, quiet: float, limit: float) -> bool:
        """Wait until no call was handed to a handler for `quiet` seconds (at most `limit`).

        Calls that reached the server before the signal may still be queued inside grpc, which
        cancels them (bare CANCELLED) the moment `server.stop()` begins: let them start first.
        True when it went quiet, False when calls were still coming at `limit`.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        seen = self._entered
        # Idle before the signal: one short look (grpc's callbacks queued behind a busy loop run
        # now) instead of the whole quiet period; tests stop many idle servers.
        probe = loop.time() - self._last_entered >= quiet
        while True:
            window = min(SETTLE_PROBE if probe else quiet, max(0.0, end - loop.time()))
            due = loop.time() + window
            await asyncio.sleep(window)
            # No call in the window proves the queue empty only if the loop ran through it: after
            # a stall (a long callback, the process descheduled) this timer runs before the calls
            # grpc handed over meanwhile reach a handler, which takes the loop a few turns more.
            stalled = loop.time() - due > window / 2
            if self._entered != seen:
                seen = self._entered
            elif not stalled and window > 0 and (probe or window >= quiet):
                return True
            probe = False  # calls came, or the look was inconclusive: whole quiet windows now
            if loop.time() >= end:
                return False

    def arrived(self) -> None:
        """A call this registry does not track (health, reflection) reached its handler: `settle`
        counts it, so the drain does not call quiet a server that is still being probed."""
        self._entered += 1
        self._last_entered = self._loop.get().time()

    async def admit(self, context: Context) -> None:
        """At the start of an untracked handler: count it, and refuse it (UNAVAILABLE SHUTTING_DOWN)
        once the drain refuses untracked calls (`close_untracked`) or all new calls."""
        self.arrived()
        self.untracked += 1
        if self.closed or self.untracked_closed:
            self.untracked_refused += 1
            await self._abort(context, self.shutdown_error(refused=True))

    def close_untracked(self) -> None:
        """From now on a health check or reflection call is refused (UNAVAILABLE SHUTTING_DOWN)."""
        self.untracked_closed = True

    def refuse_new(self) -> None:
        """From now on a call handed to a handler is refused at once (UNAVAILABLE SHUTTING_DOWN)."""
        self.closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if some still are after `timeout` seconds."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def cut(self, grace: float) -> int:
        """End every call still in flight (the grace period is over); how many were cut.

        A call in the servicer's code is cancelled; one whose message grpc is writing is marked
        and ends before its next message. Each then sends UNAVAILABLE SHUTTING_DOWN.
        """
        self._grace = grace
        self.closed = True
        calls = list(self._calls)
        for call in calls:
            call.cut = True
            if call.running and call.task is not None:
                call.ended_by_cut = True
                call.task.cancel()
        return len(calls)


async def _ends_now(messages: AsyncIterator[Any]) -> bool:
    """Whether `messages` ends without suspending (its next message is cancelled, dropped)."""
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def cancel() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    # Runs at the loop's next turn: only if the stream waits for something (the upstream).
    handle = asyncio.get_running_loop().call_soon(cancel)
    try:
        await anext(messages)
    except StopAsyncIteration:
        if fired:
            uncancel_current()
        return not fired
    except asyncio.CancelledError:
        if not fired:
            raise  # not ours: the caller went away
        uncancel_current()
        return False
    finally:
        handle.cancel()
    if fired:
        uncancel_current()
    return False  # it had more to say: cut


def uncancel_current() -> None:
    """The cancellation was ours (shutdown) and is handled: later awaits (the abort) run normally."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
