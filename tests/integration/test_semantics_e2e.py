"""The seed's request semantics end to end: the real in-process server, real HTTP to fake upstreams.

Every rule of seed-behaviour.md "Key resolution", "Tool calling", "Inner thoughts in kwargs",
"Context-window guard", the request extras and DeepSeek-R1 prompting, asserted on the exact JSON
body and headers a fake upstream received (or on the fact that it received nothing).

Several FakeUpstream instances stand for distinct providers: `openai` is configured as
LLMGW_OPENAI_BASE_URL, `openrouter` as the OpenRouter base URL, `other` is an arbitrary endpoint
in LLMGW_ALLOWED_ENDPOINTS, `byok` is an organization's BYOK provider.

Rules keyed on where an endpoint is (a host under nebius.com, LM Studio's port 1234) match the
parsed host and port, never the URL text. They are exercised twice: through `build_chat_body`
with the real host names, and end to end: host names resolved to loopback by the gateway's
resolver (patched: no /etc/hosts edits, no DNS traffic), a fake listening on port 1234 of a
free 127.0.0.x; look-alikes (`evil-nebius.com.attacker.net`, a `/nebius.com/` path, `:12345`)
get the default rules.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

import server.auth.resolver as resolver_module
from server.auth.actor import ANONYMOUS
from server.auth.resolver import Address
from server.config import Settings
from server.core.keys import ByokProvider, counting_endpoint
from server.core.openai_request import build_chat_body
from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, tool_call, usage_chunk
from tests.gateway_harness import RunningGateway, make_settings, running_gateway

OPENAI_KEY = "sk-openai-server-held-0001"
OPENROUTER_KEY = "sk-or-server-held-0002"
BYOK_KEY = "sk-byok-acme-0003"
ENCRYPTION_KEY = "test-encryption-passphrase"
REFERER = "https://agents.example.com"
TITLE = "Agents Inc"
SECRETS = (OPENAI_KEY, OPENROUTER_KEY, BYOK_KEY)
DUMMY = "Bearer DUMMY_API_KEY"
SHORT_THOUGHTS = "Deep inner monologue private to you only."
LONG_THOUGHTS = (
    "Deep inner monologue private to you only. Think before you act, so always generate arg "
    "'thinking' first before any other arg."
)
# Headers that carry or accompany credentials: asserted exactly (absent ones must be absent).
CREDENTIAL_HEADERS = ("authorization", "http-referer", "x-title", "api-key", "x-api-key")


# -- helpers ---------------------------------------------------------------------------------------


def sent_headers(recorded: Any) -> dict[str, str]:
    lowered = {k.lower(): v for k, v in recorded.headers.items()}
    return {k: lowered[k] for k in CREDENTIAL_HEADERS if k in lowered}


def error_details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, status_pb2.Status]:
    """The ErrorInfo of a failed call, decoded from the grpc-status-details-bin trailer."""
    raw = None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            raw = value
    assert raw is not None, f"no status details on {err.code()}: {err.details()}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0]
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1
    assert infos[0].domain == "llmgateway"
    return infos[0], status


async def expect_error(
    call: Any, code: grpc.StatusCode, reason: str
) -> tuple[grpc.aio.AioRpcError, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, err.details()
    info, _ = error_details(err)
    assert info.reason == reason, (info.reason, err.details())
    for secret in SECRETS:
        assert secret not in (err.details() or "")
        assert all(secret not in v for v in info.metadata.values())
    return err, dict(info.metadata)


async def stream_error(gw: RunningGateway, request: chat_pb2.CreateRequest) -> grpc.aio.AioRpcError:
    stream_request = chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in gw.chat.StreamCreate(stream_request, timeout=10):
            pass
    return caught.value


async def wait_trace(gw: RunningGateway, step_id: str) -> traces_pb2.ProviderTrace:
    """The trace of a step; traces are written asynchronously, so poll briefly."""
    for _ in range(200):
        try:
            found = await gw.traces.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=step_id), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            if found.trace.id:
                return found.trace
        await asyncio.sleep(0.02)
    raise AssertionError(f"no trace for step {step_id}")


def params(schema: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(schema)
    return s


def function(
    name: str, schema: dict[str, Any] | None = None, description: str = ""
) -> chat_pb2.FunctionDefinition:
    fn = chat_pb2.FunctionDefinition(name=name, description=description or f"The {name} function")
    if schema is not None:
        fn.parameters.CopyFrom(params(schema))
    return fn


SEND_MESSAGE = function(
    "send_message",
    {
        "type": "object",
        "properties": {"message": {"type": "string", "description": "Text"}},
        "required": ["message"],
    },
    "Send a message",
)
SEARCH = function(
    "search",
    {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    "Search",
)


def config(endpoint: str, model: str = "gpt-4o-mini", **fields: Any) -> chat_pb2.LLMConfig:
    fields.setdefault("context_window", 128_000)
    return chat_pb2.LLMConfig(model=model, model_endpoint_type="openai", model_endpoint=endpoint, **fields)


def request(
    endpoint: str,
    *,
    model: str = "gpt-4o-mini",
    cfg: dict[str, Any] | None = None,
    messages: list[chat_pb2.Message] | None = None,
    **fields: Any,
) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=config(endpoint, model, **(cfg or {})),
        messages=messages or [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Say hello")],
        **fields,
    )


@dataclass
class Upstreams:
    openai: FakeUpstream
    openrouter: FakeUpstream
    other: FakeUpstream
    byok: FakeUpstream

    def all(self) -> dict[str, FakeUpstream]:
        return {"openai": self.openai, "openrouter": self.openrouter, "other": self.other, "byok": self.byok}

    def received(self) -> dict[str, int]:
        return {name: len(up.requests) for name, up in self.all().items()}


@pytest.fixture
async def ups() -> AsyncIterator[Upstreams]:
    async with AsyncExitStack() as stack:
        fakes = []
        for _ in range(4):
            fake = FakeUpstream()
            await fake.start()
            stack.push_async_callback(fake.stop)
            fakes.append(fake)
        yield Upstreams(*fakes)


@asynccontextmanager
async def gateway_for(tmp_path: Path, ups: Upstreams, **overrides: Any) -> AsyncIterator[RunningGateway]:
    values: dict[str, Any] = {
        "openai_base_url": ups.openai.base_url,
        "openrouter_base_url": ups.openrouter.base_url,
        "allowed_endpoints": (ups.other.base_url,),
    }
    values.update(overrides)
    async with running_gateway(make_settings(tmp_path, **values)) as gw:
        yield gw


# -- 1. keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCase:
    id: str
    endpoint: str | None  # name of the upstream used as model_endpoint; None leaves it empty
    expect: str  # upstream that must receive the call
    headers: dict[str, str]
    provider_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    provider: str = ""  # the trace's provider


WITH_KEYS = {
    "openai_api_key": OPENAI_KEY,
    "openrouter_api_key": OPENROUTER_KEY,
    "openrouter_referer": REFERER,
    "openrouter_title": TITLE,
}
OPENROUTER_HEADERS = {"authorization": f"Bearer {OPENROUTER_KEY}", "http-referer": REFERER, "x-title": TITLE}

KEY_CASES = [
    KeyCase(
        "official-endpoint",
        "openai",
        "openai",
        {"authorization": f"Bearer {OPENAI_KEY}"},
        settings=WITH_KEYS,
        provider="openai",
    ),
    KeyCase(
        "empty-endpoint-means-official",
        None,
        "openai",
        {"authorization": f"Bearer {OPENAI_KEY}"},
        settings=WITH_KEYS,
        provider="openai",
    ),
    KeyCase(
        "openrouter-by-base-url",
        "openrouter",
        "openrouter",
        OPENROUTER_HEADERS,
        settings=WITH_KEYS,
        provider="openrouter",
    ),
    KeyCase(
        "openrouter-by-name-and-url",
        "openrouter",
        "openrouter",
        OPENROUTER_HEADERS,
        provider_name="openrouter",
        settings=WITH_KEYS,
        provider="openrouter",
    ),
    KeyCase(
        "openrouter-by-name-empty-endpoint",
        None,
        "openrouter",
        OPENROUTER_HEADERS,
        provider_name="openrouter",
        settings=WITH_KEYS,
        provider="openrouter",
    ),
    KeyCase(
        "openrouter-without-referer-title",
        "openrouter",
        "openrouter",
        {"authorization": f"Bearer {OPENROUTER_KEY}"},
        settings={"openai_api_key": OPENAI_KEY, "openrouter_api_key": OPENROUTER_KEY},
        provider="openrouter",
    ),
    # No OpenRouter key: the OpenAI key is for the OpenAI base URL only, so OpenRouter gets the
    # placeholder (the seed fell back to the OpenAI key; ours never sends a key elsewhere).
    KeyCase(
        "openrouter-without-its-key",
        "openrouter",
        "openrouter",
        {"authorization": DUMMY},
        settings={"openai_api_key": OPENAI_KEY, "openrouter_referer": REFERER},
        provider="openrouter",
    ),
    # A client-chosen endpoint never sees a server-held key, whatever it calls itself.
    KeyCase(
        "other-endpoint", "other", "other", {"authorization": DUMMY}, settings=WITH_KEYS, provider="openai"
    ),
    KeyCase(
        "other-endpoint-named-openrouter",
        "other",
        "other",
        {"authorization": DUMMY},
        provider_name="openrouter",
        settings=WITH_KEYS,
        provider="openrouter",
    ),
    KeyCase(
        "other-endpoint-named-openai",
        "other",
        "other",
        {"authorization": DUMMY},
        provider_name="openai",
        settings=WITH_KEYS,
        provider="openai",
    ),
    KeyCase("other-endpoint-no-keys-at-all", "other", "other", {"authorization": DUMMY}, provider="openai"),
]


@pytest.mark.parametrize("case", KEY_CASES, ids=[c.id for c in KEY_CASES])
async def test_key_resolution(tmp_path: Path, ups: Upstreams, case: KeyCase) -> None:
    async with gateway_for(tmp_path, ups, **case.settings) as gw:
        endpoint = getattr(ups, case.endpoint).base_url if case.endpoint else ""
        req = request(
            endpoint,
            cfg={"provider_name": case.provider_name},
            trace=chat_pb2.TraceContext(step_id=f"step-{case.id}"),
        )
        await gw.chat.Create(req, timeout=10)
        trace = await wait_trace(gw, f"step-{case.id}")

    expected_counts = {name: 0 for name in ups.all()}
    expected_counts[case.expect] = 1
    assert ups.received() == expected_counts
    sent = getattr(ups, case.expect).requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent_headers(sent) == case.headers
    assert sent.headers.get("Content-Type", "").startswith("application/json")
    assert sent.body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
    assert trace.provider == case.provider
    assert not trace.is_byok
    for secret in SECRETS:
        assert secret not in trace.request_json


@pytest.mark.parametrize("endpoint", [None, "openai", "openai-trailing-slash"])
@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_official_endpoint_without_key_is_missing_api_key(
    tmp_path: Path, ups: Upstreams, endpoint: str | None, rpc: str
) -> None:
    async with gateway_for(tmp_path, ups, openrouter_api_key=OPENROUTER_KEY) as gw:
        url = {None: "", "openai": ups.openai.base_url, "openai-trailing-slash": ups.openai.base_url + "/"}[
            endpoint
        ]
        req = request(url)
        if rpc == "Create":
            err, metadata = await expect_error(
                gw.chat.Create(req, timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "MISSING_API_KEY"
            )
        else:
            err = await stream_error(gw, req)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            info, _ = error_details(err)
            assert info.reason == "MISSING_API_KEY"
            metadata = dict(info.metadata)
    assert metadata["missing_fields"] == "openai_api_key"
    assert "OPENAI_API_KEY" in (err.details() or "")
    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 0}


async def test_keyless_server_still_serves_client_endpoints(tmp_path: Path, ups: Upstreams) -> None:
    """No OpenAI key: only the official endpoint fails; an allowed local proxy gets the placeholder."""
    async with gateway_for(tmp_path, ups) as gw:
        await gw.chat.Create(request(ups.other.base_url), timeout=10)
    assert sent_headers(ups.other.requests[0]) == {"authorization": DUMMY}


async def test_endpoint_not_allowed_is_refused_before_sending(tmp_path: Path, ups: Upstreams) -> None:
    async with gateway_for(tmp_path, ups, allowed_endpoints=(), **WITH_KEYS) as gw:
        _, metadata = await expect_error(
            gw.chat.Create(request(ups.other.base_url), timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "ENDPOINT_NOT_ALLOWED",
        )
    assert metadata["endpoint"] == ups.other.base_url
    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 0}


# -- 1b. BYOK --------------------------------------------------------------------------------------


@asynccontextmanager
async def byok_gateway(tmp_path: Path, ups: Upstreams, **overrides: Any) -> AsyncIterator[RunningGateway]:
    values: dict[str, Any] = {
        "encryption_key": ENCRYPTION_KEY,
        "allowed_endpoints": (ups.other.base_url, ups.byok.base_url),
    }
    values.update(overrides)
    async with gateway_for(tmp_path, ups, **values) as gw:
        created = await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="acme", model_endpoint_type="openai", base_url=ups.byok.base_url, api_key=BYOK_KEY
            ),
            timeout=10,
        )
        assert created.provider.api_key_last4 == BYOK_KEY[-4:]
        assert BYOK_KEY not in str(created)
        yield gw


def byok_request(endpoint: str, provider_name: str = "acme", step: str = "") -> chat_pb2.CreateRequest:
    return request(
        endpoint,
        cfg={"provider_name": provider_name, "provider_category": chat_pb2.PROVIDER_CATEGORY_BYOK},
        trace=chat_pb2.TraceContext(step_id=step),
    )


@pytest.mark.parametrize("server_keys", [{}, WITH_KEYS], ids=["keyless-server", "server-with-keys"])
@pytest.mark.parametrize("explicit_endpoint", [False, True], ids=["provider-base-url", "explicit-endpoint"])
async def test_byok_key_goes_to_its_base_url_only(
    tmp_path: Path, ups: Upstreams, server_keys: dict[str, Any], explicit_endpoint: bool
) -> None:
    async with byok_gateway(tmp_path, ups, **server_keys) as gw:
        endpoint = ups.byok.base_url if explicit_endpoint else ""
        response = await gw.chat.Create(byok_request(endpoint, step="step-byok"), timeout=10)
        trace = await wait_trace(gw, "step-byok")

    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 1}
    sent = ups.byok.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent_headers(sent) == {"authorization": f"Bearer {BYOK_KEY}"}
    assert sent.body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
    assert response.provider_trace_id == trace.id
    assert trace.is_byok
    assert trace.provider == "acme"
    assert trace.organization_id == "default"  # the anonymous actor's organization (auth off on loopback)
    for secret in SECRETS:
        assert secret not in trace.request_json


async def test_byok_to_a_different_endpoint_is_refused(tmp_path: Path, ups: Upstreams) -> None:
    async with byok_gateway(tmp_path, ups, **WITH_KEYS) as gw:
        for target in (ups.other, ups.openai, ups.openrouter):
            _, metadata = await expect_error(
                gw.chat.Create(byok_request(target.base_url), timeout=10),
                grpc.StatusCode.PERMISSION_DENIED,
                "ENDPOINT_NOT_ALLOWED",
            )
            assert metadata["provider_name"] == "acme"
        err = await stream_error(gw, byok_request(ups.other.base_url))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 0}


async def test_unknown_byok_provider_is_not_found(tmp_path: Path, ups: Upstreams) -> None:
    async with byok_gateway(tmp_path, ups, **WITH_KEYS) as gw:
        for endpoint in ("", ups.byok.base_url, ups.openai.base_url):
            _, metadata = await expect_error(
                gw.chat.Create(byok_request(endpoint, provider_name="nope"), timeout=10),
                grpc.StatusCode.NOT_FOUND,
                "NOT_FOUND",
            )
            assert metadata["provider_name"] == "nope"
    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 0}


async def test_byok_base_url_on_loopback_must_be_allowed_by_the_operator(
    tmp_path: Path, ups: Upstreams
) -> None:
    async with gateway_for(tmp_path, ups, encryption_key=ENCRYPTION_KEY) as gw:
        await expect_error(
            gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="acme", model_endpoint_type="openai", base_url=ups.byok.base_url, api_key=BYOK_KEY
                ),
                timeout=10,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "ENDPOINT_NOT_ALLOWED",
        )


# -- 2. tool calling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCase:
    id: str
    functions: tuple[chat_pb2.FunctionDefinition, ...]
    expect: dict[str, Any]  # the body keys besides model and messages
    fields: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)
    model: str = "gpt-4o-mini"


def strict_tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": properties,
                "additionalProperties": False,
                "required": list(properties),
            },
        },
    }


SEND_TOOL = strict_tool(
    "send_message", "Send a message", {"message": {"type": "string", "description": "Text"}}
)
SEARCH_TOOL = strict_tool("search", "Search", {"q": {"type": "string"}})
SEND_LEGACY = {
    "name": "send_message",
    "description": "Send a message",
    "parameters": {
        "type": "object",
        "properties": {"message": {"type": "string", "description": "Text"}},
        "required": ["message"],
    },
}
SEARCH_LEGACY = {
    "name": "search",
    "description": "Search",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
}
FORCED_SEARCH = {"type": "function", "function": {"name": "search"}}

TOOL_CASES = [
    ToolCase(
        "functions-default-required",
        (SEND_MESSAGE, SEARCH),
        {"tools": [SEND_TOOL, SEARCH_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
    ),
    ToolCase(
        "vllm-handle-auto",
        (SEND_MESSAGE,),
        {"tools": [SEND_TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
        cfg={"handle": "vLLM/meta-llama/Llama-3.1-8B"},
    ),
    ToolCase(
        "mlx-model-auto",
        (SEND_MESSAGE,),
        {"tools": [SEND_TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
        model="mlx-community/Qwen3-8B-4bit",
    ),
    ToolCase(
        "named-function-call-forces",
        (SEND_MESSAGE, SEARCH),
        {"tools": [SEND_TOOL, SEARCH_TOOL], "tool_choice": FORCED_SEARCH, "parallel_tool_calls": False},
        fields={"function_call": "search"},
    ),
    ToolCase(
        "force-tool-call-forces",
        (SEND_MESSAGE, SEARCH),
        {"tools": [SEND_TOOL, SEARCH_TOOL], "tool_choice": FORCED_SEARCH, "parallel_tool_calls": False},
        fields={"force_tool_call": "search"},
    ),
    ToolCase(
        "force-tool-call-wins-over-function-call",
        (SEND_MESSAGE, SEARCH),
        {"tools": [SEND_TOOL, SEARCH_TOOL], "tool_choice": FORCED_SEARCH, "parallel_tool_calls": False},
        fields={"force_tool_call": "search", "function_call": "send_message"},
    ),
    ToolCase(
        "force-tool-call-beats-vllm-auto",
        (SEND_MESSAGE, SEARCH),
        {"tools": [SEND_TOOL, SEARCH_TOOL], "tool_choice": FORCED_SEARCH, "parallel_tool_calls": False},
        fields={"force_tool_call": "search"},
        cfg={"handle": "vllm/x"},
    ),
    ToolCase(
        "function-call-auto-passes",
        (SEND_MESSAGE,),
        {"tools": [SEND_TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
        fields={"function_call": "auto"},
    ),
    ToolCase(
        "function-call-none-passes",
        (SEND_MESSAGE,),
        {"tools": [SEND_TOOL], "tool_choice": "none", "parallel_tool_calls": False},
        fields={"function_call": "none"},
    ),
    ToolCase("function-call-without-functions-dropped", (), {}, fields={"function_call": "search"}),
    ToolCase(
        "function-call-required-without-functions-dropped", (), {}, fields={"function_call": "required"}
    ),
    ToolCase(
        "legacy-functions",
        (SEND_MESSAGE, SEARCH),
        {"functions": [SEND_LEGACY, SEARCH_LEGACY], "function_call": "auto"},
        fields={"use_tool_naming": False},
    ),
    ToolCase(
        "legacy-single-function-required-forces-it",
        (SEND_MESSAGE,),
        {"functions": [SEND_LEGACY], "function_call": {"name": "send_message"}},
        fields={"use_tool_naming": False},
    ),
    ToolCase(
        "legacy-named",
        (SEND_MESSAGE, SEARCH),
        {"functions": [SEND_LEGACY, SEARCH_LEGACY], "function_call": {"name": "search"}},
        fields={"use_tool_naming": False, "function_call": "search"},
    ),
    ToolCase(
        "legacy-force-tool-call",
        (SEND_MESSAGE, SEARCH),
        {"functions": [SEND_LEGACY, SEARCH_LEGACY], "function_call": {"name": "search"}},
        fields={"use_tool_naming": False, "force_tool_call": "search"},
    ),
    ToolCase(
        "legacy-vllm-auto",
        (SEND_MESSAGE,),
        {"functions": [SEND_LEGACY], "function_call": "auto"},
        fields={"use_tool_naming": False},
        cfg={"handle": "vllm/x"},
    ),
    ToolCase(
        "use-tool-naming-true-explicit",
        (SEARCH,),
        {"tools": [SEARCH_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
        fields={"use_tool_naming": True},
    ),
    ToolCase(
        "reasoning-model-no-parallel-tool-calls",
        (SEARCH,),
        {"tools": [SEARCH_TOOL], "tool_choice": "required"},
        model="o3-mini",
    ),
]


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c.id for c in TOOL_CASES])
async def test_tool_calling(gateway: RunningGateway, upstream: FakeUpstream, case: ToolCase) -> None:
    req = request(
        upstream.base_url, model=case.model, cfg=case.cfg, functions=list(case.functions), **case.fields
    )
    await gateway.chat.Create(req, timeout=10)
    body = upstream.requests[0].body
    assert body == {
        "model": case.model,
        "messages": [{"role": "user", "content": "Say hello"}],
        **case.expect,
    }
    assert list(body) == ["model", "messages", *case.expect]


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"function_call": "nope"}, "function_call"),
        ({"force_tool_call": "nope"}, "force_tool_call"),
    ],
)
async def test_forcing_an_unknown_function_is_invalid(
    gateway: RunningGateway, upstream: FakeUpstream, fields: dict[str, Any], field_name: str
) -> None:
    req = request(upstream.base_url, functions=[SEND_MESSAGE], **fields)
    _, metadata = await expect_error(
        gateway.chat.Create(req, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"
    )
    assert metadata["field"] == field_name
    assert upstream.requests == []


async def test_force_tool_call_without_functions_is_invalid(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    req = request(upstream.base_url, force_tool_call="search")
    await expect_error(
        gateway.chat.Create(req, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"
    )
    assert upstream.requests == []


RICH_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City", "minLength": 1},
        "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 3},
        "unit": {"type": "string", "enum": ["c", "f"], "title": "Unit"},
        "when": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "ISO date",
            "format": "date",
        },
        "opts": {
            "type": "object",
            "properties": {"detailed": {"type": "boolean"}},
            "examples": [{"detailed": True}],
        },
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]+$"},
            # (no uniqueItems: strict mode cannot say it, so it would send the function
            # non-strict; tests/integration/test_hardening_semantics.py has that row)
            "maxItems": 5,
        },
    },
    "required": ["city"],
}
RICH_STRICT = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Forecast",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                # Optional properties are required and nullable (OpenAI's pattern for optional).
                "city": {"type": "string", "description": "City", "minLength": 1},
                "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 7, "default": 3},
                "opts": {
                    "type": ["object", "null"],
                    "properties": {"detailed": {"type": ["boolean", "null"]}},
                    "additionalProperties": False,
                    "required": ["detailed"],
                },
                "tags": {
                    "type": ["array", "null"],
                    "items": {"type": "string", "pattern": "^[a-z]+$"},
                    "maxItems": 5,
                },
                "unit": {"type": ["string", "null"], "enum": ["c", "f", None], "title": "Unit"},
                "when": {"type": ["string", "null"], "description": "ISO date", "format": "date"},
            },
            "additionalProperties": False,
            "required": ["city", "days", "opts", "tags", "unit", "when"],
        },
    },
}
# Sent as given (Struct keys canonicalized: required properties first, then sorted; ints restored).
RICH_PLAIN = {
    "name": "weather",
    "description": "Forecast",
    "parameters": {
        "type": "object",
        "properties": {
            k: RICH_SCHEMA["properties"][k] for k in ("city", "days", "opts", "tags", "unit", "when")
        },
        "required": ["city"],
    },
}
FREE_FORM_SCHEMA = {"type": "object", "properties": {"data": {"type": "object"}}, "required": ["data"]}


async def test_strict_conversion_in_the_body(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    free = function("free", FREE_FORM_SCHEMA, "Free-form map")
    no_params = function("ping", None, "No parameters")
    req = request(
        upstream.base_url, functions=[function("weather", RICH_SCHEMA, "Forecast"), free, no_params]
    )
    await gateway.chat.Create(req, timeout=10)
    tools = upstream.requests[0].body["tools"]
    assert tools[0] == RICH_STRICT
    assert (
        list(tools[0]["function"]["parameters"]["properties"])
        == RICH_STRICT["function"]["parameters"]["required"]
    )
    # A free-form object cannot be strict: sent unconverted (warning logged), never dropped.
    assert tools[1] == {
        "type": "function",
        "function": {"name": "free", "description": "Free-form map", "parameters": FREE_FORM_SCHEMA},
    }
    assert tools[2] == {
        "type": "function",
        "function": {
            "name": "ping",
            "description": "No parameters",
            "strict": True,
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False, "required": []},
        },
    }


async def test_legacy_functions_are_not_strict(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    req = request(
        upstream.base_url, functions=[function("weather", RICH_SCHEMA, "Forecast")], use_tool_naming=False
    )
    await gateway.chat.Create(req, timeout=10)
    body = upstream.requests[0].body
    assert body["functions"] == [RICH_PLAIN]
    assert body["function_call"] == {"name": "weather"}
    assert "tools" not in body and "tool_choice" not in body


NEBIUS_URL = "https://api.studio.nebius.com/v1"


def test_nebius_gets_auto_and_no_strict_build_chat_body() -> None:
    """nebius.com cannot be reached from the tests: the body builder with the real URL."""
    req = request(NEBIUS_URL, functions=[function("weather", RICH_SCHEMA, "Forecast"), SEARCH])
    body = build_chat_body(req, stream=False, endpoint=NEBIUS_URL)
    assert body["tools"] == [
        {"type": "function", "function": RICH_PLAIN},
        {"type": "function", "function": SEARCH_LEGACY},
    ]
    assert body["tool_choice"] == "auto"
    forced = build_chat_body(
        request(NEBIUS_URL, functions=[SEARCH], force_tool_call="search"), stream=False, endpoint=NEBIUS_URL
    )
    assert forced["tool_choice"] == FORCED_SEARCH
    assert "strict" not in forced["tools"][0]["function"]


_real_lookup = resolver_module.system_lookup
NEBIUS_HOST = "api.studio.nebius.com"
NEBIUS_LOOK_ALIKE = "evil-nebius.com.attacker.net"


async def names_on_loopback(host: str, port: int) -> list[Address]:
    """The Nebius host and its look-alike resolve to the loopback fake here."""
    if host.lower().rstrip(".") in (NEBIUS_HOST, NEBIUS_LOOK_ALIKE):
        return [(socket.AF_INET, "127.0.0.1")]
    return await _real_lookup(host, port)


async def test_nebius_host_rule_end_to_end(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host under nebius.com gets `tool_choice: "auto"` and no strict schemas; a look-alike
    host, or nebius.com in the path, gets the default `required` and strict schemas."""
    monkeypatch.setattr(resolver_module, "system_lookup", names_on_loopback)
    nebius = f"http://{NEBIUS_HOST}:{upstream.port}/v1"
    look_alike = f"http://{NEBIUS_LOOK_ALIKE}:{upstream.port}/v1"
    in_path = f"http://127.0.0.1:{upstream.port}/nebius.com/v1"
    allowed = (nebius, look_alike, in_path)
    async with running_gateway(make_settings(tmp_path, allowed_endpoints=allowed)) as gw:
        for endpoint in allowed:
            req = request(endpoint, functions=[function("weather", RICH_SCHEMA, "Forecast")])
            await gw.chat.Create(req, timeout=10)
    assert upstream.requests[0].headers["Host"] == f"{NEBIUS_HOST}:{upstream.port}"
    assert upstream.requests[0].body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "tools": [{"type": "function", "function": RICH_PLAIN}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }
    assert upstream.requests[1].headers["Host"] == f"{NEBIUS_LOOK_ALIKE}:{upstream.port}"
    assert upstream.requests[2].path == "/nebius.com/v1/chat/completions"
    for sent in upstream.requests[1:]:
        assert sent.body["tool_choice"] == "required"
        assert sent.body["tools"][0]["function"]["strict"] is True


@asynccontextmanager
async def fake_on_port(port: int) -> AsyncIterator[FakeUpstream]:
    """A fake upstream on `port` of the first 127.0.0.x where it is free (another program on this
    machine may hold LM Studio's 1234 on 127.0.0.1)."""
    fake = FakeUpstream()
    for last in range(2, 64):
        try:
            await fake.start(host=f"127.0.0.{last}", port=port)
        except OSError:
            await fake.stop()
            fake = FakeUpstream()
            continue
        break
    else:
        raise AssertionError(f"port {port} is taken on 127.0.0.2 to 127.0.0.63")
    try:
        yield fake
    finally:
        await fake.stop()


# -- 3. inner thoughts -----------------------------------------------------------------------------


def thoughts_tool(description: str, *, first: bool) -> dict[str, Any]:
    thought = {"thinking": {"type": "string", "description": description}}
    message = {"message": {"type": "string", "description": "Text"}}
    properties = {**thought, **message} if first else {**message, **thought}
    return strict_tool("send_message", "Send a message", properties)


@pytest.mark.parametrize("first", [None, True, False], ids=["default-first", "first", "last"])
async def test_inner_thoughts_kwarg_injected(
    gateway: RunningGateway, upstream: FakeUpstream, first: bool | None
) -> None:
    fields: dict[str, Any] = {} if first is None else {"put_inner_thoughts_first": first}
    req = request(
        upstream.base_url, cfg={"put_inner_thoughts_in_kwargs": True}, functions=[SEND_MESSAGE], **fields
    )
    upstream.script(
        Reply(
            json_body=completion(
                None,
                finish_reason="tool_calls",
                tool_calls=[tool_call("send_message", {"thinking": "Greet them.", "message": "hi"})],
            )
        )
    )
    await gateway.chat.Create(req, timeout=10)
    tools = upstream.requests[0].body["tools"]
    expected = thoughts_tool(SHORT_THOUGHTS, first=first is not False)
    assert tools == [expected]
    parameters = tools[0]["function"]["parameters"]
    order = ["thinking", "message"] if first is not False else ["message", "thinking"]
    assert list(parameters["properties"]) == order
    assert parameters["required"] == order


async def test_inner_thoughts_legacy_functions(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    req = request(
        upstream.base_url,
        cfg={"put_inner_thoughts_in_kwargs": True},
        functions=[SEND_MESSAGE],
        use_tool_naming=False,
    )
    await gateway.chat.Create(req, timeout=10)
    assert upstream.requests[0].body["functions"] == [
        {
            "name": "send_message",
            "description": "Send a message",
            "parameters": {
                "type": "object",
                "properties": {
                    "thinking": {"type": "string", "description": SHORT_THOUGHTS},
                    "message": {"type": "string", "description": "Text"},
                },
                "required": ["thinking", "message"],
            },
        }
    ]


@pytest.mark.parametrize("first", [True, False])
async def test_lm_studio_description_end_to_end(tmp_path: Path, first: bool) -> None:
    """Port 1234 (LM Studio's) selects the go-first description; port 12345 does not."""
    async with fake_on_port(1234) as lm_studio, fake_on_port(12345) as look_alike:
        allowed = (lm_studio.base_url, look_alike.base_url)
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=allowed)) as gw:
            for fake in (lm_studio, look_alike):
                req = request(
                    fake.base_url,
                    cfg={"put_inner_thoughts_in_kwargs": True},
                    functions=[SEND_MESSAGE],
                    put_inner_thoughts_first=first,
                )
                await gw.chat.Create(req, timeout=10)
    assert lm_studio.requests[0].body["tools"] == [thoughts_tool(LONG_THOUGHTS, first=first)]
    assert look_alike.requests[0].body["tools"] == [thoughts_tool(SHORT_THOUGHTS, first=first)]


def test_lm_studio_description_build_chat_body() -> None:
    endpoint = "http://localhost:1234/v1"
    req = request(endpoint, cfg={"put_inner_thoughts_in_kwargs": True}, functions=[SEND_MESSAGE])
    body = build_chat_body(req, stream=False, endpoint=endpoint)
    assert body["tools"] == [thoughts_tool(LONG_THOUGHTS, first=True)]


def two_choice_answer() -> dict[str, Any]:
    answer = completion(
        None,
        finish_reason="tool_calls",
        tool_calls=[
            tool_call("send_message", {"thinking": "First thought.", "message": "hi"}, "call_1"),
            tool_call("search", {"inner_thoughts": "Older name.", "q": "x"}, "call_2"),
            tool_call("search", {"q": "no thoughts here"}, "call_3"),
            tool_call("send_message", {"message": "m", "thinking": "Last."}, "call_4"),
        ],
    )
    second = json.loads(json.dumps(answer["choices"][0]))
    second["index"] = 1
    second["message"]["tool_calls"] = [
        tool_call("send_message", {"message": "x", "thinking": "Choice two."}, "c2")
    ]
    answer["choices"].append(second)
    return answer


async def test_inner_thoughts_unpacked_from_every_call(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body=two_choice_answer()))
    req = request(
        upstream.base_url, cfg={"put_inner_thoughts_in_kwargs": True}, functions=[SEND_MESSAGE, SEARCH]
    )
    response = await gateway.chat.Create(req, timeout=10)
    first, second = response.completion.choices
    assert first.message.content == "First thought.\nOlder name.\nLast."
    assert [(t.id, t.name, json.loads(t.arguments)) for t in first.message.tool_calls] == [
        ("call_1", "send_message", {"message": "hi"}),
        ("call_2", "search", {"q": "x"}),
        ("call_3", "search", {"q": "no thoughts here"}),
        ("call_4", "send_message", {"message": "m"}),
    ]
    assert second.message.content == "Choice two."
    assert json.loads(second.message.tool_calls[0].arguments) == {"message": "x"}


async def test_thoughts_left_alone_when_not_in_kwargs(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json_body=two_choice_answer()))
    response = await gateway.chat.Create(
        request(upstream.base_url, functions=[SEND_MESSAGE, SEARCH]), timeout=10
    )
    message = response.completion.choices[0].message
    assert message.content == ""
    assert json.loads(message.tool_calls[0].arguments) == {"thinking": "First thought.", "message": "hi"}


async def test_inner_thoughts_unpacked_from_a_stream(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            sse=[
                chunk({"role": "assistant", "content": None}),
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "send_message", "arguments": '{"thinking": "Hm'},
                            }
                        ]
                    }
                ),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'm.", "message": "hi"}'}}]}),
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 1,
                                "id": "call_b",
                                "type": "function",
                                "function": {
                                    "name": "search",
                                    "arguments": '{"inner_thoughts": "Then.", "q": "x"}',
                                },
                            }
                        ]
                    }
                ),
                chunk({}, finish_reason="tool_calls"),
                usage_chunk(),
                "[DONE]",
            ]
        )
    )
    req = chat_pb2.StreamCreateRequest.FromString(
        request(
            upstream.base_url, cfg={"put_inner_thoughts_in_kwargs": True}, functions=[SEND_MESSAGE, SEARCH]
        ).SerializeToString()
    )
    events = [e async for e in gateway.chat.StreamCreate(req, timeout=10)]
    final = events[-1].completion.choices[0].message
    assert final.content == "Hmm.\nThen."
    assert [json.loads(t.arguments) for t in final.tool_calls] == [{"message": "hi"}, {"q": "x"}]


@pytest.mark.parametrize("rpc", ["Create", "StreamCreate"])
async def test_non_json_arguments_are_a_clean_error(
    gateway: RunningGateway, upstream: FakeUpstream, rpc: str
) -> None:
    bad = "{'thinking': 'single quotes', oops"
    if rpc == "Create":
        upstream.script(
            Reply(
                json_body=completion(
                    None,
                    finish_reason="tool_calls",
                    tool_calls=[
                        tool_call("send_message", {"thinking": "ok", "message": "fine"}, "call_1"),
                        tool_call("send_message", bad, "call_2"),
                    ],
                )
            )
        )
    else:
        upstream.script(
            Reply(
                sse=[
                    chunk({"role": "assistant", "content": None}),
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "send_message", "arguments": '{"thinking": "ok"}'},
                                }
                            ]
                        }
                    ),
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 1,
                                    "id": "call_2",
                                    "type": "function",
                                    "function": {"name": "send_message", "arguments": bad},
                                }
                            ]
                        }
                    ),
                    chunk({}, finish_reason="tool_calls"),
                    "[DONE]",
                ]
            )
        )
    req = request(upstream.base_url, cfg={"put_inner_thoughts_in_kwargs": True}, functions=[SEND_MESSAGE])
    if rpc == "Create":
        err, metadata = await expect_error(
            gateway.chat.Create(req, timeout=10), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE"
        )
    else:
        err = await stream_error(gateway, req)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_details(err)
        assert info.reason == "UPSTREAM_BAD_RESPONSE"
        metadata = dict(info.metadata)
    assert metadata["choice_index"] == "0"
    assert metadata["tool_call_index"] == "1"
    assert metadata["function_name"] == "send_message"
    assert "not valid JSON" in (err.details() or "")
    assert "single quotes" not in (err.details() or "")  # the model's text is not echoed
    assert len(upstream.requests) == 1  # a bad answer is not retried


# -- 4. request extras -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtrasCase:
    model: str
    expect: dict[str, Any]
    cfg: dict[str, Any] = field(default_factory=dict)
    user_id: str = ""


SYSTEM_AND_USER = [
    chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are terse."),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hi"),
]
ALL_EXTRAS = {"temperature": 0.3, "max_tokens": 256, "reasoning_effort": "high"}


def _messages(system_role: str) -> list[dict[str, Any]]:
    return [{"role": system_role, "content": "You are terse."}, {"role": "user", "content": "Hi"}]


EXTRAS_CASES = [
    ExtrasCase(
        "gpt-4o",
        {
            "messages": _messages("system"),
            "max_completion_tokens": 256,
            "temperature": 0.3,
            "reasoning_effort": "high",
            "user": "user-42",
        },
        ALL_EXTRAS,
        "user-42",
    ),
    ExtrasCase("gpt-4o-mini", {"messages": _messages("system")}),
    ExtrasCase("gpt-4.1", {"messages": _messages("system"), "temperature": 0.0}, {"temperature": 0.0}),
    ExtrasCase(
        "o1",
        {
            "messages": _messages("developer"),
            "max_completion_tokens": 256,
            "temperature": 1.0,
            "reasoning_effort": "high",
            "user": "user-42",
        },
        ALL_EXTRAS,
        "user-42",
    ),
    ExtrasCase("o1-mini", {"messages": _messages("system"), "temperature": 1.0}, {"temperature": 0.2}),
    ExtrasCase("o1-preview", {"messages": _messages("developer"), "temperature": 1.0}, {"temperature": 0.2}),
    ExtrasCase(
        "o3-mini",
        {"messages": _messages("developer"), "temperature": 1.0, "reasoning_effort": "low"},
        {"temperature": 0.7, "reasoning_effort": "low"},
    ),
    ExtrasCase(
        "o4-mini", {"messages": _messages("developer"), "max_completion_tokens": 10}, {"max_tokens": 10}
    ),
    ExtrasCase(
        "gpt-5",
        {"messages": _messages("developer"), "temperature": 1.0, "reasoning_effort": "minimal", "user": "u"},
        {"temperature": 1.5, "reasoning_effort": "minimal"},
        "u",
    ),
    ExtrasCase("gpt-5-mini", {"messages": _messages("developer")}),
]


@pytest.mark.parametrize(
    "case", EXTRAS_CASES, ids=[c.model + ("-extras" if c.cfg else "") for c in EXTRAS_CASES]
)
async def test_request_extras(gateway: RunningGateway, upstream: FakeUpstream, case: ExtrasCase) -> None:
    req = request(
        upstream.base_url, model=case.model, cfg=case.cfg, messages=SYSTEM_AND_USER, user_id=case.user_id
    )
    await gateway.chat.Create(req, timeout=10)
    body = upstream.requests[0].body
    assert body == {"model": case.model, **case.expect}
    assert list(body) == ["model", *case.expect]


async def test_developer_role_is_passed_through(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    messages = [
        chat_pb2.Message(role=chat_pb2.ROLE_DEVELOPER, content="Rules."),
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hi"),
    ]
    await gateway.chat.Create(request(upstream.base_url, model="gpt-4o", messages=messages), timeout=10)
    assert upstream.requests[0].body["messages"][0] == {"role": "developer", "content": "Rules."}


async def test_stream_extras(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    called = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "search", "arguments": "{}"},
    }
    upstream.script(
        Reply(
            sse=[  # "required" (functions, no function_call) is answered with a call
                chunk({"role": "assistant", "tool_calls": [called]}),
                chunk({}, finish_reason="tool_calls"),
                usage_chunk(),
                "[DONE]",
            ]
        )
    )
    req = chat_pb2.StreamCreateRequest.FromString(
        request(
            upstream.base_url,
            model="o3",
            cfg=ALL_EXTRAS,
            messages=SYSTEM_AND_USER,
            user_id="u1",
            functions=[SEARCH],
        ).SerializeToString()
    )
    [e async for e in gateway.chat.StreamCreate(req, timeout=10)]
    assert upstream.requests[0].body == {
        "model": "o3",
        "messages": _messages("developer"),
        "tools": [SEARCH_TOOL],
        "tool_choice": "required",
        "max_completion_tokens": 256,
        "temperature": 1.0,
        "reasoning_effort": "high",
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- 5. context-window guard -----------------------------------------------------------------------


def long_request(endpoint: str, model: str, window: int, **fields: Any) -> chat_pb2.CreateRequest:
    messages = [
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are a careful assistant. " * 20),
        chat_pb2.Message(
            role=chat_pb2.ROLE_USER,
            content="Summarize the following text: " + "lorem ipsum " * 300,
            name="alice",
        ),
        chat_pb2.Message(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[chat_pb2.ToolCall(id="call_0", name="search", arguments='{"q": "lorem"}')],
        ),
        chat_pb2.Message(
            role=chat_pb2.ROLE_TOOL, content='{"result": "dolor sit amet"}', tool_call_id="call_0"
        ),
    ]
    return request(
        endpoint,
        model=model,
        cfg={"context_window": window, **fields.pop("cfg", {})},
        messages=messages,
        **fields,
    )


GUARD_CASES = [
    ("gpt-4o", "o200k_base", {}, {}),
    (
        "gpt-4o-mini",
        "o200k_base",
        {"put_inner_thoughts_in_kwargs": True},
        {"functions": [function("weather", RICH_SCHEMA, "Forecast"), SEARCH]},
    ),
    ("o3-mini", "o200k_base", {}, {"functions": [SEARCH]}),
    ("gpt-4", "cl100k_base", {}, {}),
    (
        "gpt-3.5-turbo",
        "cl100k_base",
        {"put_inner_thoughts_in_kwargs": True},
        {"functions": [SEND_MESSAGE], "put_inner_thoughts_first": False},
    ),
    ("openai/gpt-4o", "o200k_base", {}, {"functions": [SEARCH], "use_tool_naming": False}),
]


async def count(gw: RunningGateway, req: chat_pb2.CreateRequest) -> chat_pb2.CountTokensResponse:
    return await gw.chat.CountTokens(
        chat_pb2.CountTokensRequest.FromString(req.SerializeToString()), timeout=10
    )


@pytest.mark.parametrize(
    ("model", "encoding", "cfg", "fields"),
    GUARD_CASES,
    ids=[c[0] + f"-{i}" for i, c in enumerate(GUARD_CASES)],
)
async def test_context_window_guard_matches_count_tokens(
    gateway: RunningGateway,
    upstream: FakeUpstream,
    model: str,
    encoding: str,
    cfg: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    counted = await count(gateway, long_request(upstream.base_url, model, 0, cfg=dict(cfg), **fields))
    assert counted.encoding == encoding
    total = counted.total_tokens
    assert total == counted.prompt_tokens + counted.function_tokens
    assert total > 600
    assert (counted.function_tokens > 0) == bool(fields.get("functions"))

    for window in (total - 1, 1):
        req = long_request(upstream.base_url, model, window, cfg=dict(cfg), **fields)
        assert (await count(gateway, req)).context_window == window
        err, metadata = await expect_error(
            gateway.chat.Create(req, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_WINDOW_EXCEEDED"
        )
        message = err.details() or ""
        assert "maximum context length" in message
        assert str(total) in message and str(window) in message
        assert metadata == {
            "prompt_tokens": str(counted.prompt_tokens),
            "function_tokens": str(counted.function_tokens),
            "total_tokens": str(total),
            "context_window": str(window),
            "encoding": encoding,
        }
        stream_err = await stream_error(gateway, req)
        assert stream_err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stream_err.details() == message
    assert upstream.requests == []  # nothing left the gateway

    # Exactly at the window the request goes through.
    await gateway.chat.Create(
        long_request(upstream.base_url, model, total, cfg=dict(cfg), **fields), timeout=10
    )
    assert len(upstream.requests) == 1


async def test_context_window_zero_means_unknown(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    await gateway.chat.Create(long_request(upstream.base_url, "gpt-4o", 0), timeout=10)
    assert len(upstream.requests) == 1


async def test_too_long_for_keyless_official_endpoint_sends_nothing(tmp_path: Path, ups: Upstreams) -> None:
    """Too long for the official endpoint without a key: either error, but nothing is sent."""
    async with gateway_for(tmp_path, ups) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.chat.Create(long_request(ups.openai.base_url, "gpt-4o", 10), timeout=10)
    assert caught.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert ups.received() == {"openai": 0, "openrouter": 0, "other": 0, "byok": 0}


async def test_count_tokens_equals_guard_for_byok_lm_studio_endpoint(tmp_path: Path, ups: Upstreams) -> None:
    """CountTokens must count what the guard counts, also when the endpoint comes from a BYOK provider.

    The BYOK provider's base URL is on LM Studio's port 1234, so the inner-thoughts description,
    hence the function tokens, depend on which endpoint is used.
    """
    async with (
        fake_on_port(1234) as lm_studio,
        gateway_for(
            tmp_path, ups, encryption_key=ENCRYPTION_KEY, allowed_endpoints=(lm_studio.base_url,)
        ) as gw,
    ):
        lm_base = lm_studio.base_url
        await gw.providers.CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="lm", model_endpoint_type="openai", base_url=lm_base, api_key=BYOK_KEY
            ),
            timeout=10,
        )
        cfg = {
            "provider_name": "lm",
            "provider_category": chat_pb2.PROVIDER_CATEGORY_BYOK,
            "put_inner_thoughts_in_kwargs": True,
        }
        counted = await count(gw, long_request("", "gpt-4o", 0, cfg=cfg, functions=[SEND_MESSAGE]))
        req = long_request("", "gpt-4o", counted.total_tokens, cfg=cfg, functions=[SEND_MESSAGE])
        await gw.chat.Create(req, timeout=10)  # fits exactly what CountTokens said
    assert lm_studio.requests[0].body["tools"] == [thoughts_tool(LONG_THOUGHTS, first=True)]


async def test_counting_endpoint_is_the_endpoint_resolve_target_calls() -> None:
    """The endpoint gateway.count_tokens counts for."""
    settings = Settings(
        openai_base_url="https://oa.example/v1", openrouter_base_url="https://or.example/api/v1"
    )

    async def lookup(organization_id: str, name: str) -> ByokProvider | None:
        assert organization_id == ANONYMOUS.organization_id
        return ByokProvider(name, "http://lm.example:1234/v1/", "k") if name == "lm" else None

    async def endpoint(**cfg: Any) -> str:
        return await counting_endpoint(
            chat_pb2.LLMConfig(model="m", **cfg), settings=settings, actor=ANONYMOUS, byok_provider=lookup
        )

    byok = chat_pb2.PROVIDER_CATEGORY_BYOK
    assert await endpoint() == "https://oa.example/v1"
    assert await endpoint(model_endpoint="http://x.example/v1/") == "http://x.example/v1"
    assert await endpoint(provider_name="openrouter") == "https://or.example/api/v1"
    assert await endpoint(provider_name="lm", provider_category=byok) == "http://lm.example:1234/v1"
    assert await endpoint(provider_name="lm", provider_category=byok, model_endpoint="http://y.example") == (
        "http://y.example"
    )
    with pytest.raises(Exception, match="no BYOK provider named 'nope'"):
        await endpoint(provider_name="nope", provider_category=byok)


# -- 6. DeepSeek-R1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["deepseek-r1", "deepseek-ai/DeepSeek-R1", "DeepSeek-R1-Distill-Qwen-32B"])
@pytest.mark.parametrize("with_functions", [True, False])
async def test_deepseek_r1_on_openai_endpoint_is_passed_through(
    gateway: RunningGateway, upstream: FakeUpstream, model: str, with_functions: bool
) -> None:
    functions = [SEND_MESSAGE] if with_functions else []
    req = request(upstream.base_url, model=model, messages=list(SYSTEM_AND_USER), functions=functions)
    before = req.SerializeToString()
    await gateway.chat.Create(req, timeout=10)
    body = upstream.requests[0].body
    expected: dict[str, Any] = {"model": model, "messages": _messages("system")}
    if with_functions:
        expected.update({"tools": [SEND_TOOL], "tool_choice": "required", "parallel_tool_calls": False})
    assert body == expected
    assert "<available functions>" not in json.dumps(body)
    assert req.SerializeToString() == before


@pytest.mark.parametrize("with_functions", [True, False])
async def test_deepseek_r1_prompting_on_a_local_endpoint(
    gateway: RunningGateway, upstream: FakeUpstream, with_functions: bool
) -> None:
    """The local path (vLLM completions) gets the functions in the system prompt; no crash without."""
    answer = '{"function": "send_message", "params": {"message": "hi"}}' if with_functions else "Hello."
    upstream.script(
        Reply(
            json_body={
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": "r1",
                "choices": [{"index": 0, "text": answer, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )
    )
    req = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="deepseek-r1",
            model_endpoint_type="vllm",
            model_endpoint=upstream.base_url,
            context_window=32_000,
        ),
        messages=list(SYSTEM_AND_USER),
        functions=[SEND_MESSAGE] if with_functions else [],
    )
    response = await gateway.chat.Create(req, timeout=10)
    sent = upstream.requests[0]
    assert sent.path == "/v1/completions"
    prompt = sent.body["prompt"]
    assert "You are terse." in prompt
    assert ("<available functions>" in prompt) is with_functions
    assert ('"function" and "params"' in prompt) is with_functions
    message = response.completion.choices[0].message
    if with_functions:
        assert message.tool_calls[0].name == "send_message"
    else:
        assert message.content == "Hello."
