"""Issue 12: model names that pick the encoding (item 12), inline vs off-loop counting (item 6)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from server.core import offload, tokens
from server.core.tokens import CL100K_BASE, O200K_BASE, count_request_tokens, encoding_for_model


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # Fine-tuned models are named ft:<base>:<org>:<suffix>:<id>: the base decides.
        ("ft:gpt-4.1-2025-04-14:acme::B1x2", O200K_BASE),
        ("ft:gpt-4.1-mini-2025-04-14:acme:support:B1x2", O200K_BASE),
        ("ft:gpt-4.1-nano-2025-04-14:acme::B1x2", O200K_BASE),
        ("ft:gpt-4o-2024-08-06:acme::9abc", O200K_BASE),
        ("ft:gpt-4o-mini-2024-07-18:org::id", O200K_BASE),
        ("ft:o4-mini-2025-04-16:acme::id", O200K_BASE),
        ("ft:gpt-3.5-turbo-0125:acme::id", CL100K_BASE),
        ("ft:gpt-4-0613:acme::id", CL100K_BASE),
        ("ft:davinci-002:acme::id", CL100K_BASE),
        # Provider prefixes, dated names, variants and spelling.
        ("openai/gpt-4o", O200K_BASE),
        ("openrouter/openai/gpt-4.1", O200K_BASE),
        ("openai/ft:gpt-4.1-2025-04-14:acme::id", O200K_BASE),
        ("openai/gpt-4o:online", O200K_BASE),
        ("gpt-4o:free", O200K_BASE),
        ("GPT-4o", O200K_BASE),
        ("gpt-4o-2024-08-06", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("gpt-4.5-preview", O200K_BASE),
        ("o1-mini", O200K_BASE),
        ("o1", O200K_BASE),
        ("o3-mini-2025-01-31", O200K_BASE),
        ("gpt-5-mini", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("gpt-oss-120b", O200K_BASE),
        ("gpt-oss", O200K_BASE),
        ("codex-mini-latest", O200K_BASE),
        ("gpt-4-turbo", CL100K_BASE),
        ("gpt-4-0613", CL100K_BASE),
        ("gpt-3.5-turbo", CL100K_BASE),
        ("llama3.1:8b", CL100K_BASE),
        ("", CL100K_BASE),
    ],
)
def test_model_names_pick_the_encoding_of_their_base_model(model: str, expected: str) -> None:
    assert encoding_for_model(model)[1] == expected


def test_a_whitespace_run_tiktoken_cannot_split_is_still_counted() -> None:
    # o200k's split pattern overflows fancy-regex's stack on ~1M spaces: tiktoken panics with a
    # PanicException (a BaseException), which no handler of the request path would catch.
    text = "word " + " " * 1_200_000 + "end"
    result = count_request_tokens([{"role": "user", "content": text}], None, "gpt-4o")
    assert result.encoding == O200K_BASE
    # The run costs about 1 token per 128 spaces (o200k's longest whitespace token).
    assert 1_200_000 // 128 <= result.prompt_tokens <= 1_200_000 // 64


def _runs_without_suspending(coro: Any) -> Any:
    """The coroutine's result if it finished without ever giving the loop up, else fail."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the count was suspended: it went off the loop")


def test_small_counts_stay_inline() -> None:
    messages = [{"role": "system", "content": "You are helpful. " * 200}, {"role": "user", "content": "hi"}]
    counted = _runs_without_suspending(tokens.count_request_tokens_async(messages, None, "gpt-4o"))
    assert counted == count_request_tokens(messages, None, "gpt-4o")
    texts = ["x" * (tokens.INLINE_CHARS // 2)] * 2
    assert _runs_without_suspending(tokens.count_texts_async(texts, "gpt-4o")) == 2 * len(
        encoding_for_model("gpt-4o")[0].encode_ordinary(texts[0])
    )


async def test_large_counts_go_off_the_loop_and_agree_with_inline_counts() -> None:
    # Many strings each under the budget: their sum is over it, so the rest goes off the loop.
    messages = [{"role": "user", "content": f"message {n} " + "lorem ipsum " * 500} for n in range(40)]
    functions = [{"name": "f", "description": "d " * (tokens.INLINE_CHARS + 10), "parameters": {}}]
    coro = tokens.count_request_tokens_async(messages, functions, "gpt-4o")
    with pytest.raises(AssertionError, match="suspended"):
        _runs_without_suspending(coro)
    tokens.clear_memo()
    off_loop = await tokens.count_request_tokens_async(messages, functions, "gpt-4o")
    assert off_loop == count_request_tokens(messages, functions, "gpt-4o")
    # The strings encoded off the loop were remembered: the same request is now inline.
    assert (
        _runs_without_suspending(tokens.count_request_tokens_async(messages, functions, "gpt-4o")) == off_loop
    )


async def test_offload_runs_at_most_pool_size_jobs_and_cancelled_waiters_never_run() -> None:
    lock = threading.Lock()
    running = 0
    most = 0
    release = threading.Event()
    ran: list[int] = []

    def job(n: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1
            ran.append(n)
        return n

    jobs = [asyncio.create_task(offload.run(lambda n=n: job(n))) for n in range(offload.POOL_SIZE + 3)]
    await asyncio.sleep(0.05)
    waiting = jobs[-1]
    waiting.cancel()  # still waiting for a slot: it never starts
    await asyncio.sleep(0.05)
    release.set()
    results = await asyncio.gather(*jobs[:-1])
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert results == list(range(offload.POOL_SIZE + 2))
    assert most == offload.POOL_SIZE
    assert sorted(ran) == results
    # The slots all came back: a full round runs again.
    again = await asyncio.gather(*[offload.run(lambda: 1) for _ in range(offload.POOL_SIZE * 2)])
    assert again == [1] * (offload.POOL_SIZE * 2)


async def test_a_cancelled_caller_keeps_its_slot_until_its_running_job_ends() -> None:
    # A job already running cannot be stopped: its slot must stay taken until it ends, or a
    # caller that keeps cancelling could start any number of threads' worth of work.
    release = threading.Event()
    started = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        started.set()
        release.wait(10)
        with lock:
            running -= 1

    first = [asyncio.create_task(offload.run(job)) for _ in range(offload.POOL_SIZE)]
    await asyncio.to_thread(started.wait, 10)
    await asyncio.sleep(0.05)
    for task in first:
        task.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    later = asyncio.create_task(offload.run(job))
    await asyncio.sleep(0.1)
    assert not later.done()  # still waiting: every slot is held by a job that is still running
    # ...on the semaphore, not in the executor's unbounded queue.
    assert offload._executor()._work_queue.qsize() == 0  # noqa: SLF001 - the property under test
    release.set()
    await later
    assert most == offload.POOL_SIZE
