"""Issue 12, item 13: a key echoed by an upstream never reaches the caller, nor the trace.

A real loopback HTTP upstream echoes the Authorization header it received into its answer: in the
content and reasoning of a completion, in tool-call arguments, and streamed one character per SSE
chunk. The real gateway calls it with a server key configured for that base URL, and with a BYOK
provider; whatever the gRPC client receives (each event, the deltas concatenated, the final
completion) and the stored trace must not contain the key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2, providers_pb2

from server.auth.redact import REDACTED
from server.auth.store_sqlite import SqliteAuthStore
from tests.echo_upstream import EchoUpstream
from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.trace_polling import wait_for_trace

SEND = chat_pb2.FunctionDefinition(name="send_message", description="Say something")
SEND.parameters.update(
    {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
)


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    upstream = EchoUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def _key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(30)


async def _calls(
    gw: RunningGateway, config: chat_pb2.LLMConfig, metadata: Any, *, step: str, key: str
) -> list[str]:
    """Create and StreamCreate, with and without a tool: everything the client got, as text."""
    seen: list[str] = []
    for tools in (False, True):
        functions = [SEND] if tools else []
        request = chat_request(
            "",
            llm_config=config,
            functions=functions,
            trace=chat_pb2.TraceContext(step_id=f"{step}-{tools}-create"),
        )
        response = await gw.chat.Create(request, metadata=metadata, timeout=20)
        seen.append(response.SerializeToString().decode("latin-1"))
        seen.append(json_format.MessageToJson(response))
        message = response.completion.choices[0].message
        if not tools or message.content:
            assert f"you sent Bearer {REDACTED} ok" in message.content + message.reasoning_content
        if tools:
            assert REDACTED in message.tool_calls[0].arguments

        request.trace.step_id = f"{step}-{tools}-stream"
        stream = gw.chat.StreamCreate(
            chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()),
            metadata=metadata,
            timeout=20,
        )
        events = [event async for event in stream]
        assert events[-1].HasField("completion")
        content = "".join(e.delta.content for e in events[:-1])
        reasoning = "".join(e.delta.reasoning_content for e in events[:-1])
        arguments = "".join(t.arguments for e in events[:-1] for t in e.delta.tool_calls)
        seen += [content, reasoning, arguments]
        seen += [e.SerializeToString().decode("latin-1") for e in events]
        final = events[-1].completion.choices[0].message
        assert f"you sent Bearer {REDACTED} ok" in reasoning + final.reasoning_content
        if tools:
            # The arguments still parse as JSON: the scrubber replaced, never cut, the text.
            assert json.loads(arguments) == {"message": f"you sent Bearer {REDACTED} ok"}
            assert final.tool_calls[0].arguments == arguments
        else:
            assert content == f"you sent Bearer {REDACTED} ok" == final.content
        for traced in (f"{step}-{tools}-create", f"{step}-{tools}-stream"):
            trace = await wait_for_trace(gw.traces, traced, metadata=metadata)
            seen.append(json_format.MessageToJson(trace))
    assert all(key not in text for text in seen)
    return seen


async def test_server_key_echoed_by_its_upstream_is_scrubbed(tmp_path: Path, echo: EchoUpstream) -> None:
    key = _key("sk-proj-")
    settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=echo.base_url)
    async with running_gateway(settings) as gw:
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint=echo.base_url,
            context_window=128000,
        )
        await _calls(gw, config, None, step="server", key=key)
    assert echo.authorizations and all(a == f"Bearer {key}" for a in echo.authorizations)


async def test_byok_key_echoed_by_its_endpoint_is_scrubbed(tmp_path: Path, echo: EchoUpstream) -> None:
    db = tmp_path / "gateway.db"
    async with SqliteAuthStore(path=str(db)) as store:
        _, admin = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
    metadata = (("authorization", f"Bearer {admin}"),)
    key = "byok-" + secrets.token_hex(24)  # no known key shape: only the known value can catch it
    settings = make_settings(
        tmp_path,
        auth="required",
        encryption_key="pass-" + secrets.token_hex(8),
        allowed_endpoints=(echo.base_url,),
    )
    async with running_gateway(settings) as gw:
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="mine", model_endpoint_type="openai", base_url=echo.base_url, api_key=key
            ),
            metadata=metadata,
            timeout=10,
        )
        config = chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            provider_name="mine",
            provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
            context_window=128000,
        )
        await _calls(gw, config, metadata, step="byok", key=key)
    assert echo.authorizations and all(a == f"Bearer {key}" for a in echo.authorizations)


async def test_local_server_key_echoed_is_scrubbed(tmp_path: Path, echo: EchoUpstream) -> None:
    key = _key("local-")
    settings = make_settings(
        tmp_path,
        local_auth_type="bearer_token",
        local_base_url=echo.root_url,
        local_api_key=key,
        allowed_endpoints=(echo.root_url,),
    )
    async with running_gateway(settings) as gw:
        config = chat_pb2.LLMConfig(
            model="llama", model_endpoint_type="llamacpp", model_endpoint=echo.root_url, context_window=8192
        )
        request = chat_request("", llm_config=config, trace=chat_pb2.TraceContext(step_id="local-create"))
        response = await gw.chat.Create(request, timeout=20)
        request.trace.step_id = "local-stream"
        assert response.completion.choices[0].message.content == f"you sent Bearer {REDACTED} ok"
        stream = gw.chat.StreamCreate(
            chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()), timeout=20
        )
        events = [event async for event in stream]
        content = "".join(e.delta.content for e in events[:-1])
        assert content == f"you sent Bearer {REDACTED} ok"
        assert events[-1].completion.choices[0].message.content == content
        seen = [response.SerializeToString().decode("latin-1")]
        for step in ("local-create", "local-stream"):
            seen.append(json_format.MessageToJson(await wait_for_trace(gw.traces, step)))
        seen += [e.SerializeToString().decode("latin-1") for e in events]
        assert all(key not in text for text in seen)
    assert echo.authorizations and all(a == f"Bearer {key}" for a in echo.authorizations)


async def test_a_key_split_over_paced_reads_is_scrubbed(tmp_path: Path) -> None:
    # Each piece a read of its own (the stream loop's one-chunk fast path): a piece where a key
    # may begin, and every piece while the scrubber holds text back, goes through the scrubber.
    key = _key("sk-proj-")
    upstream = FakeUpstream()
    await upstream.start()
    try:
        text = f"you sent {key} ok"
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        upstream.script(Reply(sse=text_stream(pieces), chunk_delay=0.003))
        settings = make_settings(tmp_path, openai_api_key=key, openai_base_url=upstream.base_url)
        async with running_gateway(settings) as gw:
            config = chat_pb2.LLMConfig(
                model="gpt-4o-mini",
                model_endpoint_type="openai",
                model_endpoint=upstream.base_url,
                context_window=128000,
            )
            request = chat_request("", llm_config=config, trace=chat_pb2.TraceContext(step_id="paced-key"))
            stream = gw.chat.StreamCreate(
                chat_pb2.StreamCreateRequest.FromString(request.SerializeToString()), timeout=20
            )
            events = [event async for event in stream]
            trace = await wait_for_trace(gw.traces, "paced-key")
    finally:
        await upstream.stop()
    content = "".join(e.delta.content for e in events[:-1])
    assert content == f"you sent {REDACTED} ok" == events[-1].completion.choices[0].message.content
    seen = [
        content,
        json_format.MessageToJson(trace),
        *(e.SerializeToString().decode("latin-1") for e in events),
    ]
    assert all(key not in text and key[:12] not in text for text in seen)
