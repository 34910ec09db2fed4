"""StreamCreate's parts run by InFlight.stream's own generator (no servicer generator around the
gateway's): every way a stream ends gives the status, the RequestScope count and the order of
events it gave when the servicer had a generator of its own, and leaves no reference cycle.

The handler is the one the server runs (ChatCompletionServicer.handlers() after Service.track);
the gateway's stream is a generator that records how it ended and whether the caller's status
had gone out by then (a trace written after the status may be written after the drain's
wait_idle returned, when the trace writer is closing).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from llmgateway.v1 import chat_pb2
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from server.api.chat import ChatCompletionServicer
from server.api.context import Authenticator
from server.api.handlers import Service
from server.api.status import abort
from server.errors import UpstreamUnavailable
from server.gateway import Gateway
from server.inflight import InFlight
from tests.gc_helpers import collector_off

_METHOD = "/llmgateway.v1.ChatCompletionService/StreamCreate"


class _Context:
    """What grpc's servicer context does here: abort sets the code and raises AbortError."""

    def __init__(self, log: list[str]) -> None:
        self._log = log
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self._code = code
        self._log.append(f"status {code.name}")
        raise grpc.aio.AbortError("Locally aborted.")

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class _Auth:
    def __init__(self, fail: bool = False) -> None:
        self._fail = fail

    async def actor_for(self, context: Any) -> Any:
        if self._fail:
            raise UpstreamUnavailable("auth backend down")
        return object()


class _Gateway:
    """Yields `ready` deltas at once, then waits (the upstream is slow) unless `fail` says to
    raise; logs how it ended."""

    def __init__(self, log: list[str], ready: int, fail: bool = False, then: int = 0) -> None:
        self._log = log
        self._ready = ready
        self._fail = fail
        self._then = then
        self.gate = asyncio.Event()

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            for i in range(self._ready):
                yield b"d%d" % i
            if self._fail:
                raise UpstreamUnavailable("the upstream broke mid-stream")
            await self.gate.wait()
            for i in range(self._then):
                yield b"late%d" % i
        except BaseException as exc:
            self._log.append(f"gateway {type(exc).__name__}")
            raise
        self._log.append("gateway done")

    def stream_wire(self, request: Any, actor: Any, deadline: Any) -> AsyncIterator[bytes]:
        return self._events()


def _handler(gateway: Any, auth: Any, calls: InFlight) -> Any:
    servicer = ChatCompletionServicer(cast(Gateway, gateway), cast(Authenticator, auth))
    handlers = servicer.handlers()
    assert isinstance(handlers, Service)
    handlers.track(calls)
    return handlers._handlers[_METHOD].unary_stream


def _counts(model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "llmgw_requests_total"
                and labels.get("rpc") == "StreamCreate"
                and labels.get("model") == model
            ):
                out[labels["code"]] = out.get(labels["code"], 0.0) + sample.value
    return out


def _grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {code: n - before.get(code, 0.0) for code, n in after.items() if n != before.get(code, 0.0)}


def _request(model: str) -> bytes:
    config = chat_pb2.LLMConfig(model=model, model_endpoint_type="openai", model_endpoint="http://x")
    return chat_pb2.CreateRequest(llm_config=config).SerializeToString()


async def _run(
    model: str, gateway: _Gateway, log: list[str], *, cut_after: int | None, auth: Any = None
) -> tuple[list[bytes], str, dict[str, float], InFlight]:
    """The stream read to its end; the cut (if any) marks it after `cut_after` messages, as the
    grace period ending while grpc writes that message does."""
    calls = InFlight(abort)
    handler = _handler(gateway, auth or _Auth(), calls)
    before = _counts(model)
    received: list[bytes] = []
    outcome = "ended OK"
    messages = handler(_request(model), _Context(log))
    try:
        async for message in messages:
            received.append(message)
            if cut_after is not None and len(received) == cut_after:
                assert calls.cut(0.0) == 1
                log.append("cut")
    except grpc.aio.AbortError:
        outcome = "aborted"
    log.append(f"left, {len(calls)} in flight")
    return received, outcome, _grown(before, _counts(model)), calls


@pytest.mark.parametrize("ready", [1, 2])
async def test_a_stream_cut_in_grpcs_write_ends_shutting_down_after_its_request_path(ready: int) -> None:
    # ready=2: the next delta is there at once (dropped: the stream is cut, the gateway's
    # generator closed); ready=1: it waits on the upstream (cancelled by _ends_now).
    log: list[str] = []
    model = f"revchunk-cut-{ready}"
    received, outcome, counts, calls = await _run(model, _Gateway(log, ready), log, cut_after=1)
    assert received == [b"d0"]
    assert outcome == "aborted"
    ended = "gateway GeneratorExit" if ready == 2 else "gateway CancelledError"
    # The request path unwound (its trace written) before the status, and before the call left.
    assert log == ["cut", ended, "status UNAVAILABLE", "left, 0 in flight"]
    assert counts == {"UNAVAILABLE": 1}
    assert metrics._in_flight_cell("stream").value == 0


async def test_a_stream_cut_in_grpcs_write_after_its_last_message_ends_ok() -> None:
    log: list[str] = []
    gateway = _Gateway(log, 1)
    gateway.gate.set()  # nothing to wait for: the stream ends without suspending
    received, outcome, counts, _ = await _run("revchunk-cut-last", gateway, log, cut_after=1)
    assert (received, outcome) == ([b"d0"], "ended OK")
    assert log == ["cut", "gateway done", "left, 0 in flight"]
    assert counts == {"OK": 1}


async def test_a_failure_after_a_delta_is_its_status_never_ok() -> None:
    log: list[str] = []
    received, outcome, counts, _ = await _run(
        "revchunk-fail", _Gateway(log, 2, fail=True), log, cut_after=None
    )
    assert (received, outcome) == ([b"d0", b"d1"], "aborted")
    assert log == ["gateway UpstreamUnavailable", "status UNAVAILABLE", "left, 0 in flight"]
    assert counts == {"UNAVAILABLE": 1}


async def test_a_failure_before_the_first_delta_and_in_the_head() -> None:
    log: list[str] = []
    received, outcome, counts, _ = await _run(
        "revchunk-fail0", _Gateway(log, 0, fail=True), log, cut_after=None
    )
    assert (received, outcome, counts) == ([], "aborted", {"UNAVAILABLE": 1})
    log.clear()
    # The head fails (authentication): counted with empty labels, the gateway never asked.
    before = _counts("")
    received, outcome, _, _ = await _run(
        "revchunk-auth", _Gateway(log, 1), log, cut_after=None, auth=_Auth(True)
    )
    assert (received, outcome) == ([], "aborted")
    assert log == ["status UNAVAILABLE", "left, 0 in flight"]
    assert _grown(before, _counts("")).get("UNAVAILABLE") == 1
    # Bytes that are no CreateRequest: INVALID_ARGUMENT, before the gateway.
    calls = InFlight(abort)
    handler = _handler(_Gateway(log, 1), _Auth(), calls)
    context = _Context(log)
    with pytest.raises(grpc.aio.AbortError):
        async for _ in handler(b"\xff\xff\xff", context):
            pass
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_cut_while_it_waits_on_the_upstream_ends_shutting_down() -> None:
    log: list[str] = []
    model = "revchunk-cut-running"
    calls = InFlight(abort)
    gateway = _Gateway(log, 1)
    handler = _handler(gateway, _Auth(), calls)
    before = _counts(model)
    messages = handler(_request(model), _Context(log))
    assert await anext(messages) == b"d0"
    reading = asyncio.ensure_future(anext(messages))
    await asyncio.sleep(0.01)  # it waits on the gate (the upstream)
    assert calls.cut(0.0) == 1
    with pytest.raises(grpc.aio.AbortError):
        await reading
    assert log == ["gateway CancelledError", "status UNAVAILABLE"]
    assert _grown(before, _counts(model)) == {"UNAVAILABLE": 1}
    assert len(calls) == 0


@pytest.mark.parametrize("ready", [1, 2])
async def test_a_cut_stream_leaves_no_cycle(ready: int) -> None:
    log: list[str] = []
    gateway = _Gateway(log, ready)
    with collector_off():
        task = asyncio.ensure_future(_run(f"revchunk-cycle-{ready}", gateway, log, cut_after=1))
        await task
        task_ref = weakref.ref(task)
        del task
        await asyncio.sleep(0)
        assert task_ref() is None, "the cut stream's task is kept alive by a reference cycle"


class _BrokenCloseGateway(_Gateway):
    """Its request path fails while it unwinds (a bug there): the call's status must not change."""

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            yield b"d0"
            yield b"d1"
        finally:
            self._log.append("gateway closing")
            raise RuntimeError("a bug while closing")


async def test_a_failure_closing_a_cut_stream_keeps_the_shutting_down_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before the gateway's generator was closed by the loop's finalizer, after the status: a bug
    # in its unwinding was logged there. Closed by InFlight.stream, it must not escape the
    # handler instead of the SHUTTING_DOWN status (grpc would send UNKNOWN, counted UNAVAILABLE).
    log: list[str] = []
    model = "revchunk-broken-close"
    received, outcome, counts, _ = await _run(model, _BrokenCloseGateway(log, 2), log, cut_after=1)
    assert (received, outcome) == ([b"d0"], "aborted")
    assert log == ["cut", "gateway closing", "status UNAVAILABLE", "left, 0 in flight"]
    assert counts == {"UNAVAILABLE": 1}
    assert "failed while closing" in caplog.text and "a bug while closing" in caplog.text


class _MessagesGateway:
    async def _events(self) -> AsyncIterator[chat_pb2.StreamCreateResponse]:
        for text in ("a", "b"):
            event = chat_pb2.StreamCreateResponse()
            event.delta.content = text
            yield event

    def stream_wire(self, request: Any, actor: Any, deadline: Any) -> AsyncIterator[Any]:
        return self._events()


@pytest.mark.parametrize("tracked", [False, True])
async def test_streamcreate_served_by_a_real_grpc_server(
    tracked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio runs a stream handler that is not an async generator function as a sync one (in
    its thread pool, iterating what it returns: UNKNOWN "'async_generator' object is not
    iterable"): the handler handlers() gives must be one, and Service.track must still hand
    InFlight.stream the parts (no servicer generator of its own per call)."""
    from llmgateway.v1 import chat_pb2_grpc

    from server.api import chat

    servicer = ChatCompletionServicer(cast(Gateway, _MessagesGateway()), cast(Authenticator, _Auth()))
    handlers = servicer.handlers()
    assert isinstance(handlers, Service)
    if tracked:
        handlers.track(InFlight(abort))

        def untracked(*args: Any) -> Any:
            raise AssertionError("tracked, the parts run in InFlight.stream's generator")

        monkeypatch.setattr(chat, "_run_stream", untracked)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)  # type: ignore[no-untyped-call]
            request = chat_pb2.StreamCreateRequest.FromString(_request("revchunk-served"))
            events = [event async for event in stub.StreamCreate(request, timeout=10)]
        assert [e.delta.content for e in events] == ["a", "b"]
    finally:
        await server.stop(None)


class _AbortingGateway:
    """Aborts the call itself after a delta (an AbortError from inside the request path)."""

    def __init__(self, log: list[str]) -> None:
        self._log = log
        self.context: _Context | None = None

    async def _events(self) -> AsyncIterator[bytes]:
        yield b"d0"
        assert self.context is not None
        await self.context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied", ())

    def stream_wire(self, request: Any, actor: Any, deadline: Any) -> AsyncIterator[bytes]:
        return self._events()


async def test_an_abort_from_inside_the_gateway_passes_as_it_is() -> None:
    log: list[str] = []
    model = "revchunk-inner-abort"
    gateway = _AbortingGateway(log)
    calls = InFlight(abort)
    handler = _handler(gateway, _Auth(), calls)
    gateway.context = context = _Context(log)
    before = _counts(model)
    received = []
    with pytest.raises(grpc.aio.AbortError):
        async for message in handler(_request(model), context):
            received.append(message)
    assert received == [b"d0"]
    assert log == ["status PERMISSION_DENIED"]  # no second status (no map_exception, no INTERNAL)
    assert _grown(before, _counts(model)) == {"PERMISSION_DENIED": 1}
    assert len(calls) == 0


@pytest.mark.parametrize("where", ["waiting upstream", "in grpc's write"])
async def test_a_caller_leaving_mid_stream_counts_cancelled_closes_the_request_path_and_leaves_no_cycle(
    where: str,
) -> None:
    # Waiting upstream: grpc cancels the handler's task. In grpc's write: grpc's task is
    # cancelled there, and the stream's generator is closed (aclose) at its yield.
    log: list[str] = []
    model = f"revchunk-left-{where.split()[0]}"
    calls = InFlight(abort)
    handler = _handler(_Gateway(log, 1), _Auth(), calls)
    before = _counts(model)

    async def consume() -> None:
        messages = handler(_request(model), _Context(log))
        assert await anext(messages) == b"d0"
        if where == "waiting upstream":
            await anext(messages)
        else:
            await messages.aclose()

    with collector_off():
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        ended = "gateway CancelledError" if where == "waiting upstream" else "gateway GeneratorExit"
        assert log == [ended]  # no status of ours: the caller is gone
        assert _grown(before, _counts(model)) == {"CANCELLED": 1}
        assert len(calls) == 0
        task_ref = weakref.ref(task)
        del task
        await asyncio.sleep(0)
        assert task_ref() is None, "the stream's task is kept alive by a reference cycle"
