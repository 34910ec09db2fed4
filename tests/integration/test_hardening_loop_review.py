"""Review of issue 12 item 6: the rest of the CPU work that grows with the input, off the loop.

A huge function set (1,000 functions of 30 properties with 20-option enums, ~10 MB; inside
`MAX_FUNCTIONS` and the 64 MiB message limit) used to hold the event loop for seconds on its
first request: validation, Struct -> dict conversion (and strict conversion), and the function
token count, all pure Python. Same criterion as tests/integration/test_hardening_tokens.py: the
gateway, the fake upstream and the test share one loop, and tiny calls must keep completing
while the huge call is in flight (>= 3 of them, no gap of 1 s or more).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core import offload, openai_request, tokens, validation
from server.core.validation import MAX_FUNCTIONS
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_hardening_tokens import MAX_GAP_S, as_task, health_check, tiny_calls_while


def huge_tool_set(
    functions: int = MAX_FUNCTIONS, properties: int = 30, options: int = 20
) -> list[chat_pb2.FunctionDefinition]:
    out = []
    for f in range(functions):
        parameters = struct_pb2.Struct()
        parameters.update(
            {
                "type": "object",
                "properties": {
                    f"p{p}": {
                        "type": "string",
                        "description": f"property {p} of tool {f}",
                        "enum": [f"o{f}_{p}_{o}" for o in range(options)],
                    }
                    for p in range(properties)
                },
                "required": [f"p{p}" for p in range(properties)],
            }
        )
        out.append(
            chat_pb2.FunctionDefinition(
                name=f"tool_{f}", description=f"tool number {f}", parameters=parameters
            )
        )
    return out


@pytest.fixture(scope="module")
def tool_set() -> list[chat_pb2.FunctionDefinition]:
    return huge_tool_set()


@pytest.fixture(autouse=True)
def _cold_caches() -> None:
    # The first request of an agent is the expensive one: nothing prepared or counted yet.
    openai_request.clear_caches()
    tokens.clear_memo()


def test_the_tool_set_is_huge_and_a_normal_one_is_not(tool_set: list[chat_pb2.FunctionDefinition]) -> None:
    keys = tuple(fn.SerializeToString() for fn in tool_set)
    assert sum(map(len, keys)) > 8_000_000
    assert validation.off_loop(keys)
    assert not validation.off_loop(tuple(fn.SerializeToString() for fn in huge_tool_set(20, 10, 5)))


@pytest.mark.parametrize("call", ["Create", "CountTokens"])
async def test_huge_tool_set_leaves_other_calls_answered(
    gateway: RunningGateway, upstream: FakeUpstream, tool_set: list[chat_pb2.FunctionDefinition], call: str
) -> None:
    request = chat_request(upstream.base_url, context_window=50_000_000)
    request.functions.extend(tool_set)
    request.function_call = "auto"  # the fake's text answer is then an answer
    big = as_task(getattr(gateway.chat, call)(request, timeout=120))
    completed, worst = await tiny_calls_while(big, health_check(gateway.channel))
    answer = await big
    if call == "Create":
        assert answer.completion.choices[0].message.content == "Hello!"
        assert len(upstream.requests) == 1
    else:
        assert answer.function_tokens > 1_000_000
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a health check waited {worst:.2f} s behind the tool set"


async def test_callers_past_their_deadline_while_waiting_for_the_pool_never_run(
    gateway: RunningGateway, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool is full (POOL_SIZE counts held running); the calls queued behind it end
    # DEADLINE_EXCEEDED at their deadline, their counts never start, and the slots come back.
    release = threading.Event()
    encoded: list[str] = []
    original = tokens.encoded_length

    def held(encoding: Any, text: str) -> int:
        if len(text) > tokens.INLINE_CHARS:
            encoded.append(text[:8])
            release.wait(30)
        return original(encoding, text)

    monkeypatch.setattr(tokens, "encoded_length", held)

    def request(tag: str) -> chat_pb2.CreateRequest:
        return chat_request(upstream.base_url, (chat_pb2.ROLE_USER, tag + "x" * (tokens.INLINE_CHARS + 10)))

    running = [
        as_task(gateway.chat.CountTokens(request(f"run{n:04d}"), timeout=60))
        for n in range(offload.POOL_SIZE)
    ]
    while len(encoded) < offload.POOL_SIZE:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    late = [as_task(gateway.chat.CountTokens(request(f"late{n:03d}"), timeout=0.5)) for n in range(3)]
    outcomes = await asyncio.gather(*late, return_exceptions=True)
    assert time.monotonic() - started < 3
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
    assert {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.DEADLINE_EXCEEDED
    }
    await asyncio.sleep(0.2)  # the server saw the deadlines pass
    release.set()
    answers = await asyncio.gather(*running)
    assert all(a.prompt_tokens > tokens.INLINE_CHARS // 8 for a in answers)
    after = await gateway.chat.CountTokens(request("after000"), timeout=10)
    assert after.prompt_tokens > 0
    assert not [tag for tag in encoded if tag.startswith("late")], encoded
