"""Issue 12, item 6's class: a local model's huge or broken output does not hold the loop.

Parsing the output into a function call is pure Python; a long output is parsed in the offload
pool and the reading is linear in its size (tests/unit/test_hardening_local_parse.py), so other
calls keep being answered meanwhile. The old code parsed inline, re-reading the text from each
of up to 64 candidate braces: 100,000 characters held the loop ~6 s.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from tests.gateway_harness import make_settings, running_gateway
from tests.integration.test_hardening_tokens import MAX_GAP_S, as_task, health_check, tiny_calls_while
from tests.local_fakes import Answer, LocalServer
from tests.unit.test_hardening_local_parse import nested_then_broken


def _send_message() -> chat_pb2.FunctionDefinition:
    parameters = struct_pb2.Struct()
    parameters.update(
        {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
    )
    return chat_pb2.FunctionDefinition(name="send_message", description="Say it.", parameters=parameters)


async def test_a_long_broken_local_answer_leaves_other_calls_answered(tmp_path: Path) -> None:
    server = LocalServer("koboldcpp")
    await server.start()
    try:
        settings = make_settings(tmp_path, allowed_endpoints=(server.root_url,))
        async with running_gateway(settings) as gw:
            server.script(Answer(text=nested_then_broken(100_000)))
            request = chat_pb2.CreateRequest(
                llm_config=chat_pb2.LLMConfig(
                    model="some-local-model",
                    model_endpoint_type="koboldcpp",
                    model_endpoint=server.base_url,
                    context_window=8192,
                ),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hello")],
                functions=[_send_message()],
            )
            big = as_task(gw.chat.Create(request, timeout=100))
            completed, worst = await tiny_calls_while(big, health_check(gw.channel))
            try:
                await big
            except grpc.aio.AioRpcError as exc:
                error = exc
            else:
                raise AssertionError("a broken answer was accepted")
    finally:
        await server.stop()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not a function call" in (error.details() or "")
    assert completed >= 3, completed
    assert worst < MAX_GAP_S, f"a health check waited {worst:.2f} s behind the parse"
