"""The three-step agent loop (tool call, tool result, answer) on Azure, Groq and DeepSeek, unary
and streamed, through the real gateway and each one's fake: what the second request carried is
checked as JSON, as for Anthropic and Gemini (tests/integration/test_*_gateway.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream, tool_call, usage_chunk
from tests.fakes import azure_fake
from tests.fakes.azure_fake import AzureFake
from tests.gateway_harness import RunningGateway, make_settings, running_gateway

USER = chat_pb2.ROLE_USER
TOOL = chat_pb2.ROLE_TOOL


class GroqFake(FakeUpstream):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openai/v1"


@dataclass
class Case:
    endpoint_type: str
    model: str
    fake: FakeUpstream
    settings: dict[str, Any]
    path: str


@pytest.fixture(params=["azure", "groq", "deepseek"])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[Case]:
    kind: str = request.param
    fake: FakeUpstream
    if kind == "azure":
        fake = AzureFake(key="azure-" + "z" * 26)
    elif kind == "groq":
        fake = GroqFake()
    else:
        fake = FakeUpstream()
    await fake.start()
    try:
        if kind == "azure":
            assert isinstance(fake, AzureFake)
            yield Case(
                "azure",
                azure_fake.DEPLOYMENT,
                fake,
                {"azure_base_url": fake.resource_url, "azure_api_key": fake.key},
                f"/openai/deployments/{azure_fake.DEPLOYMENT}/chat/completions",
            )
        elif kind == "groq":
            settings = {"groq_base_url": fake.base_url, "groq_api_key": "gsk_" + "g" * 52}
            yield Case("groq", "llama-3.3-70b-versatile", fake, settings, "/openai/v1/chat/completions")
        else:
            settings = {"deepseek_base_url": fake.base_url, "deepseek_api_key": "sk-" + "d" * 32}
            yield Case("deepseek", "deepseek-chat", fake, settings, "/v1/chat/completions")
    finally:
        await fake.stop()


@pytest.fixture
async def gateway(tmp_path: Path, case: Case) -> AsyncIterator[RunningGateway]:
    async with running_gateway(make_settings(tmp_path, **case.settings)) as gw:
        yield gw


def weather_function() -> chat_pb2.FunctionDefinition:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return chat_pb2.FunctionDefinition(name="get_weather", description="Weather", parameters=params)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_three_step_agent_loop(gateway: RunningGateway, case: Case, streamed: bool) -> None:
    call = tool_call("get_weather", '{"city": "Paris"}', "call_7")
    if streamed:
        case.fake.script(
            Reply(
                sse=[
                    chunk({"role": "assistant", "content": None}),
                    chunk({"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}]}),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}),
                    chunk({}, finish_reason="tool_calls"),
                    usage_chunk(40, 12),
                    "[DONE]",
                ]
            ),
            Reply(sse=text_stream(["It is 21", " degrees."])),
        )  # fmt: skip
    else:
        case.fake.script(
            Reply(json_body=completion(None, tool_calls=[call], finish_reason="tool_calls")),
            Reply(json_body=completion("It is 21 degrees.")),
        )

    async def step(*messages: chat_pb2.Message) -> chat_pb2.ChatCompletion:
        config = chat_pb2.LLMConfig(
            model=case.model, model_endpoint_type=case.endpoint_type, context_window=64_000
        )
        req = chat_pb2.CreateRequest(
            llm_config=config, messages=messages, functions=[weather_function()], function_call="auto"
        )
        if streamed:
            stream_req = chat_pb2.StreamCreateRequest.FromString(req.SerializeToString())
            events = [e async for e in gateway.chat.StreamCreate(stream_req, timeout=10)]
            last: chat_pb2.ChatCompletion = events[-1].completion
            return last
        response: chat_pb2.CreateResponse = await gateway.chat.Create(req, timeout=10)
        return response.completion

    history = [chat_pb2.Message(role=USER, content="Weather in Paris?")]
    first = await step(*history)  # 1: the model calls the tool
    assert first.choices[0].finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    (made,) = first.choices[0].message.tool_calls
    assert (made.id, made.name, made.arguments) == ("call_7", "get_weather", '{"city": "Paris"}')
    history += [
        first.choices[0].message,
        chat_pb2.Message(role=TOOL, content='{"temp": 21}', tool_call_id=made.id),
    ]
    second = await step(*history)  # 2: the tool result goes back, 3: the answer
    assert second.choices[0].message.content == "It is 21 degrees."
    assert second.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    assert [r.path for r in case.fake.requests] == [case.path, case.path]
    sent = case.fake.requests[1].body
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_7"},
    ]
    assert sent["tool_choice"] == "auto"
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent.get("stream", False) is streamed
