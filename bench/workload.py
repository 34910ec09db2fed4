"""The request every target gets: the same prompt and tools as a gRPC CreateRequest and as OpenAI JSON."""

from __future__ import annotations

import json
from typing import Any

MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
CONTEXT_WINDOW = 128_000

SYSTEM_PROMPT = (
    "You are a helpful assistant embedded in an agent framework. You keep memory blocks, call tools "
    "when they help, and answer briefly. Persona: a patient engineer who explains trade-offs plainly. "
    "Human: a developer evaluating gateways between agents and language model providers; prefers "
    "numbers over adjectives and short answers over long ones. Always think about which tool fits, "
    "never invent tool results, and say so when you do not know. "
) * 2
USER_PROMPT = "Summarise the last three messages in one sentence, then suggest one next step."

TOOLS: list[dict[str, Any]] = [
    {
        "name": "send_message",
        "description": "Sends a message to the human user.",
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string", "description": "Message contents."}},
            "required": ["message"],
        },
    },
    {
        "name": "archival_memory_search",
        "description": "Search archival memory using semantic (embedding-based) search.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "String to search for."},
                "page": {"type": "integer", "description": "Page of results to return (0 is the first)."},
            },
            "required": ["query"],
        },
    },
]


def grpc_request_bytes(endpoint: str, endpoint_type: str = "openai", model: str = MODEL) -> bytes:
    """A serialized CreateRequest (wire-identical to StreamCreateRequest) for `endpoint`."""
    from google.protobuf import struct_pb2
    from llmgateway.v1 import chat_pb2

    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model=model,
            model_endpoint_type=endpoint_type,
            model_endpoint=endpoint,
            context_window=CONTEXT_WINDOW,
            handle=f"{endpoint_type}/{model}",
        ),
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=SYSTEM_PROMPT),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=USER_PROMPT),
        ],
        trace=chat_pb2.TraceContext(step_id="step-bench", agent_id="agent-bench", run_id="run-bench"),
        # As the JSON body LiteLLM gets (`tool_choice: auto`): the upstream streams text, which the
        # gateway's default `required` would refuse as TOOL_CALL_MISSING.
        function_call="auto",
    )
    for tool in TOOLS:
        parameters = struct_pb2.Struct()
        parameters.update(tool["parameters"])
        request.functions.add(name=tool["name"], description=tool["description"], parameters=parameters)
    return request.SerializeToString()


def openai_body(*, stream: bool, model: str = MODEL) -> bytes:
    """The same request as OpenAI chat-completions JSON (what LiteLLM and the direct path get)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT},
        ],
        "tools": [{"type": "function", "function": tool} for tool in TOOLS],
        "tool_choice": "auto",
        "user": "user-bench",
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()
