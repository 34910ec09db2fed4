"""Review of issue 12 item 6 (server/core/offload.py, the counting paths in server/core/tokens.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest

from server.core import offload, tokens, validation
from server.core.validation import MAX_FUNCTIONS


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    tokens.clear_memo()


def _function(n: int, properties: int = 3) -> dict[str, Any]:
    return {
        "name": f"tool_{n}",
        "description": f"tool number {n}",
        "parameters": {
            "type": "object",
            "properties": {
                f"p{p}": {"type": "string", "enum": [f"v{n}_{p}_{o}" for o in range(5)]}
                for p in range(properties)
            },
        },
    }


def _spy_functions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    walked: list[int] = []
    original = tokens._one_function_tokens

    def spy(entry: Any, count: Any) -> int:
        walked.append(1)
        return original(entry, count)

    monkeypatch.setattr(tokens, "_one_function_tokens", spy)
    return walked


# -- the per-function memo -------------------------------------------------------------------------


def test_a_tool_set_of_max_functions_is_remembered_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old memo held 512 entries and was cleared when full: an agent with more tools than that
    # walked (and looked up every string of) its whole tool set again on every step.
    functions = [_function(n) for n in range(MAX_FUNCTIONS)]
    encoding, _ = tokens.encoding_for_model("gpt-4o")
    first = tokens.count_function_tokens(functions, encoding)
    walked = _spy_functions(monkeypatch)
    assert tokens.count_function_tokens(functions, encoding) == first
    assert walked == []


def test_the_function_memo_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_FUNCTION_TOKENS_BUDGET_BYTES", 50_000)
    functions = [_function(n, properties=20) for n in range(60)]  # ~2.5 KB of JSON each
    encoding, _ = tokens.encoding_for_model("gpt-4o")
    expected = tokens.count_function_tokens(functions, encoding)
    assert tokens._FUNCTION_TOKENS_HELD <= 50_000
    held = sum(tokens._function_weight(entry, n) for entry, n in tokens._FUNCTION_TOKENS.values())
    assert held <= 50_000
    assert 0 < len(tokens._FUNCTION_TOKENS) < 60
    assert tokens.count_function_tokens(functions, encoding) == expected  # forgetting is only slower


# -- the inline budget is per request, not per string ----------------------------------------------


def test_many_medium_messages_share_one_inline_budget() -> None:
    # 250 messages of 30,000 new characters each (7.5 M, inside MAX_REQUEST_CHARS): each is under
    # INLINE_CHARS, but the budget is the request's, so all but the first go to the pool.
    messages = [{"role": "user", "content": chr(0x4E00 + n) * 30_000} for n in range(250)]
    started = tokens.start_request_count(messages, None, "gpt-4o")
    assert isinstance(started, tokens.PendingCount)
    assert len(started.prompt_left) == 249


# -- offload.run -----------------------------------------------------------------------------------


def test_a_loop_that_waited_for_a_slot_is_not_kept_alive() -> None:
    # asyncio.Semaphore remembers the loop it first waited on; kept as the value of a
    # WeakKeyDictionary keyed by that loop, it kept every such loop (and its selector) forever.
    gate = threading.Event()

    async def contend() -> None:
        jobs = [offload.run(gate.wait) for _ in range(offload.POOL_SIZE + 2)]
        asyncio.get_running_loop().call_later(0.05, gate.set)
        await asyncio.gather(*jobs)

    refs = []
    for _ in range(3):
        gate.clear()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(contend())
        loop.close()
        refs.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []


async def test_slots_stay_bounded_and_come_back_after_cancelled_waiters() -> None:
    gate = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def job() -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait()
        with lock:
            running -= 1
        return 1

    jobs = [asyncio.ensure_future(offload.run(job)) for _ in range(offload.POOL_SIZE * 3)]
    await asyncio.sleep(0.05)
    for waiter in jobs[offload.POOL_SIZE : offload.POOL_SIZE * 2]:
        waiter.cancel()
    await asyncio.sleep(0)
    gate.set()
    done = await asyncio.gather(*jobs, return_exceptions=True)
    assert sum(1 for d in done if d == 1) == offload.POOL_SIZE * 2
    assert most <= offload.POOL_SIZE
    # Every slot came back: POOL_SIZE jobs run at once again.
    gate.clear()
    again = [asyncio.ensure_future(offload.run(job)) for _ in range(offload.POOL_SIZE)]
    await asyncio.sleep(0.05)
    assert running == offload.POOL_SIZE
    gate.set()
    await asyncio.gather(*again)


async def test_a_base_exception_in_the_pool_reaches_the_caller_as_an_exception() -> None:
    # pyo3's PanicException derives from BaseException: escaping a job it would pass every
    # `except Exception` of the servicers and leave the call unanswered until its deadline.
    class PanicException(BaseException):
        pass

    def panics() -> None:
        raise PanicException("boom")

    with pytest.raises(Exception, match="boom") as caught:
        await offload.run(panics)
    assert isinstance(caught.value.__cause__, PanicException)


# -- a caller that goes away -----------------------------------------------------------------------


async def test_a_count_whose_caller_gave_up_is_still_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    # A caller past its deadline retries the same prompt: the count its first attempt paid for
    # must not be thrown away, or a count slower than the deadline would never succeed.
    text = "\u4e00" * (tokens.INLINE_CHARS + 10)
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    original = tokens.encoded_length

    def slow(encoding: Any, value: str) -> int:
        if value != text:  # the role, counted inline
            return original(encoding, value)
        started.set()
        release.wait()
        try:
            return original(encoding, value)
        finally:
            finished.set()

    monkeypatch.setattr(tokens, "encoded_length", slow)
    caller = asyncio.ensure_future(
        tokens.count_request_tokens_async([{"role": "user", "content": text}], None, "gpt-4o")
    )
    await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await asyncio.to_thread(finished.wait, 5)
    await asyncio.sleep(0.05)
    encoding, _ = tokens.encoding_for_model("gpt-4o")
    assert tokens._memo(encoding).cache.get(text) == original(encoding, text)


# -- the function-set key itself -------------------------------------------------------------------


def _runs_without_suspending(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("suspended: it went off the loop")


def _definitions(functions: int, properties: int) -> list[Any]:
    from google.protobuf import struct_pb2
    from llmgateway.v1 import chat_pb2

    out = []
    for n, d in enumerate(_function(f, properties) for f in range(functions)):
        parameters = struct_pb2.Struct()
        parameters.update(d["parameters"])
        out.append(
            chat_pb2.FunctionDefinition(name=d["name"], description=d["description"], parameters=parameters)
        )
        assert n == len(out) - 1
    return out


def test_a_normal_function_set_is_keyed_on_the_loop() -> None:
    functions = _definitions(20, 5)
    assert _runs_without_suspending(validation.function_keys_async(functions)) == validation.function_keys(
        functions
    )


async def test_a_huge_function_set_is_keyed_in_the_pool_past_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Serializing a 10 MB function set is itself ~50 ms of the loop per request (every request:
    # the bytes are the cache key): only the first OFFLOAD_FUNCTION_BYTES are serialized here.
    functions = _definitions(300, 10)
    keys = validation.function_keys(functions)
    assert validation.off_loop(keys)
    on_loop: list[int] = []
    loop_thread = threading.get_ident()
    original = validation._serialized

    def spy(function: Any) -> bytes:
        if threading.get_ident() == loop_thread:
            on_loop.append(1)
        return original(function)

    monkeypatch.setattr(validation, "_serialized", spy)
    assert await validation.function_keys_async(functions) == keys
    assert 0 < sum(on_loop) < 300
    assert sum(map(len, keys[: sum(on_loop) - 1])) <= validation.OFFLOAD_FUNCTION_BYTES


async def test_a_slot_released_between_a_waiters_cancellation_and_its_wakeup_is_not_lost() -> None:
    slots = offload._Slots(1)
    await slots.acquire()
    first = asyncio.ensure_future(slots.acquire())
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    first.cancel()
    slots.release()  # before `first` runs its cancellation: the slot must go to `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    slots.release()
    assert slots.free == 1
    assert not slots.waiters


async def test_slots_under_random_cancellation_end_where_they_started() -> None:
    import random

    rng = random.Random(12)
    slots = offload._Slots(3)
    held = 0
    most = 0

    async def user() -> None:
        nonlocal held, most
        await slots.acquire()
        held += 1
        most = max(most, held)
        try:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        finally:
            held -= 1
            slots.release()

    for _ in range(20):
        tasks = [asyncio.ensure_future(user()) for _ in range(30)]
        for _ in range(5):
            await asyncio.sleep(0)
            for task in rng.sample(tasks, 4):
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (slots.free, len(slots.waiters), held) == (3, 0, 0)
    assert most <= 3
