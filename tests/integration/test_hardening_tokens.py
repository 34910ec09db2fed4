"""Issue 12, item 6 (and the streamed-usage part of item 12): counting huge texts leaves the loop free.

The gateway, the fake upstream and these tests share one event loop, so a count that held the
loop would hold every call below with it. Each test runs one huge call and, meanwhile, a series
of tiny calls on the same gateway; the tiny calls must keep completing while the huge one is in
flight. The bound on the gap between two tiny answers (1 s) is a generous responsiveness bound:
the old code held the loop for several seconds at a time (a 1.9-million-character CJK message
costs ~1.5 s to encode), the fixed code holds it for a few tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from server.core import tokens
from server.core.validation import MAX_MESSAGE_CHARS
from tests.fake_upstream import FakeUpstream, Reply, chunk
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.local_fakes import Answer, LocalServer

T = TypeVar("T")
MAX_GAP_S = 1.0
BIG_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def cjk(chars: int, seed: int) -> str:
    """Random CJK ideographs: one regex piece for tiktoken, its slowest input per character."""
    rng = random.Random(seed)
    return "".join(rng.choices([chr(c) for c in range(0x4E00, 0x9FFF)], k=chars))


HUGE = cjk(1_900_000, seed=12)  # inside MAX_MESSAGE_CHARS
assert len(HUGE) < MAX_MESSAGE_CHARS


def huge_messages(count: int) -> list[tuple[int, str]]:
    # Distinct texts (a different first character), so no count is remembered from another.
    return [(chat_pb2.ROLE_USER, chr(0x4E00 + n) + HUGE[1:]) for n in range(count)]


async def tiny_calls_while(
    big: asyncio.Task[Any], tiny: Callable[[], Awaitable[object]]
) -> tuple[int, float]:
    """Tiny calls, one after another, until `big` is done: how many completed, the worst gap."""
    completed = 0
    worst = 0.0
    last = time.monotonic()
    while not big.done():
        await tiny()
        now = time.monotonic()
        worst = max(worst, now - last)
        last = now
        completed += 1
        await asyncio.sleep(0.01)  # paced: a tight loop of calls would starve the counting thread
    return completed, worst


def as_task(call: Awaitable[T]) -> asyncio.Task[T]:
    """A gRPC call object is awaitable but not a coroutine: wrap it to run it as a task."""

    async def wait() -> T:
        return await call

    return asyncio.create_task(wait())


def health_check(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=30)


@pytest.fixture
async def big_channel(gateway: RunningGateway) -> AsyncIterator[chat_pb2_grpc.ChatCompletionServiceStub]:
    """A client that takes answers over gRPC's default 4 MiB, for the huge answers."""
    channel = grpc.aio.insecure_channel(gateway.address, options=BIG_CHANNEL_OPTIONS)
    try:
        yield chat_pb2_grpc.ChatCompletionServiceStub(channel)
    finally:
        await channel.close()


async def test_huge_prompt_guard_leaves_other_calls_answered(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    request = chat_request(upstream.base_url, *huge_messages(2), context_window=50_000_000)
    big = as_task(gateway.chat.Create(request, timeout=100))
    completed, worst = await tiny_calls_while(big, health_check(gateway.channel))
    answer = await big
    assert answer.completion.choices[0].message.content == "Hello!"
    assert len(upstream.requests) == 1
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a health check waited {worst:.2f} s behind the count"


async def test_huge_prompt_over_the_window_is_still_refused(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Counted off the loop, the guard's answer is the same: refused, nothing sent.
    request = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, HUGE[:400_000]), context_window=100_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.chat.Create(request, timeout=100)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length" in (caught.value.details() or "")
    assert upstream.requests == []


async def test_huge_count_tokens_leaves_other_calls_answered(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Two copies of one text: texts this long are never remembered, so each is encoded.
    request = chat_request(upstream.base_url, *[(chat_pb2.ROLE_USER, HUGE)] * 2)
    tiny = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, "hello world"))
    big = as_task(gateway.chat.CountTokens(request, timeout=100))
    completed, worst = await tiny_calls_while(big, lambda: gateway.chat.CountTokens(tiny, timeout=30))
    answer = await big
    encoding, _ = tokens.encoding_for_model("gpt-4o-mini")
    content = await asyncio.to_thread(lambda: len(encoding.encode_ordinary(HUGE)))
    assert answer.prompt_tokens == 3 + 2 * (3 + 1 + content)  # priming; per message: 3, role, content
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a tiny CountTokens waited {worst:.2f} s behind the huge one"


def unmetered_stream(pieces: list[str]) -> list[dict[str, object] | str]:
    """An OpenAI-style stream that never sends usage (many OpenAI-compatible servers do not)."""
    events: list[dict[str, object] | str] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, finish_reason="stop"))
    events.append("[DONE]")
    return events


async def test_huge_streamed_answer_usage_leaves_other_calls_answered(
    gateway: RunningGateway,
    upstream: FakeUpstream,
    big_channel: chat_pb2_grpc.ChatCompletionServiceStub,
) -> None:
    answer_text = cjk(2_500_000, seed=7)  # ~7.5 MB of UTF-8, in pieces of 100,000 characters
    pieces = [answer_text[i : i + 100_000] for i in range(0, len(answer_text), 100_000)]
    upstream.script(Reply(sse=unmetered_stream(pieces)))
    request = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, "write a lot"), context_window=0)

    async def read_stream() -> chat_pb2.StreamCreateResponse:
        events = [event async for event in big_channel.StreamCreate(request, timeout=100)]
        return events[-1]

    big = asyncio.create_task(read_stream())
    tiny = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, "hello world"))
    completed, worst = await tiny_calls_while(big, lambda: gateway.chat.CountTokens(tiny, timeout=30))
    last = await big
    encoding, _ = tokens.encoding_for_model("gpt-4o-mini")
    assert last.completion.choices[0].message.content == answer_text
    completion_tokens = await asyncio.to_thread(lambda: len(encoding.encode_ordinary(answer_text)))
    assert last.completion.usage.completion_tokens == completion_tokens
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a tiny CountTokens waited {worst:.2f} s behind the usage count"


async def test_streamed_usage_counts_the_prompt_without_a_window(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # Item 12: no usage from the upstream and no context window used to report prompt_tokens 0.
    upstream.script(Reply(sse=unmetered_stream(["Hello", " there"])))
    request = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, "hello world"), context_window=0)
    events = [event async for event in gateway.chat.StreamCreate(request, timeout=30)]
    usage = events[-1].completion.usage
    counted = await gateway.chat.CountTokens(request, timeout=30)
    assert counted.total_tokens > 0
    assert usage.prompt_tokens == counted.total_tokens
    assert usage.completion_tokens == 2
    assert usage.total_tokens == usage.prompt_tokens + 2


async def test_huge_local_prompt_and_answer_leave_other_calls_answered(tmp_path: Path) -> None:
    # The local-server path counts the prompt (always, for usage) and the answer when the
    # server reports no usage (koboldcpp never does). The fake server takes bodies up to 1 MiB,
    # so the prompt is the smaller part here; the answer is the ~2.5 s count of the old code.
    server = LocalServer("koboldcpp")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            answer_text = cjk(3_000_000, seed=3)
            server.script(Answer(text=answer_text))
            request = chat_pb2.CreateRequest(
                llm_config=chat_pb2.LLMConfig(
                    model="some-local-model",
                    model_endpoint_type="koboldcpp",
                    model_endpoint=server.base_url,
                    context_window=0,
                ),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=HUGE[:250_000])],
            )
            channel = grpc.aio.insecure_channel(gw.address, options=BIG_CHANNEL_OPTIONS)
            try:
                stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                big = as_task(stub.Create(request, timeout=100))
                completed, worst = await tiny_calls_while(big, health_check(gw.channel))
                answer = await big
            finally:
                await channel.close()
    finally:
        await server.stop()
    encoding, _ = tokens.encoding_for_model("some-local-model")
    assert answer.completion.choices[0].message.content == answer_text
    completion_tokens = await asyncio.to_thread(lambda: len(encoding.encode_ordinary(answer_text)))
    assert answer.completion.usage.completion_tokens == completion_tokens
    assert answer.completion.usage.prompt_tokens > 250_000
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a health check waited {worst:.2f} s behind the local counts"


async def test_a_text_tiktoken_panics_on_is_counted_not_a_hung_call(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # ~1M spaces overflow fancy-regex's stack under o200k_base: tiktoken raised PanicException,
    # a BaseException, which escaped every handler; the call hung until the caller's deadline.
    text = "word " + " " * 1_200_000 + "end"
    request = chat_request(upstream.base_url, (chat_pb2.ROLE_USER, text), context_window=1_000_000)
    counted = await gateway.chat.CountTokens(request, timeout=10)
    assert counted.encoding == "o200k_base"
    assert 1_200_000 // 128 <= counted.prompt_tokens <= 1_200_000 // 64
    answer = await gateway.chat.Create(request, timeout=10)
    assert answer.completion.choices[0].message.content == "Hello!"
