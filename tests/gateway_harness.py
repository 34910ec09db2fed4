"""Run the real gateway in-process on port 0, with stubs for every service."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from llmgateway.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    providers_pb2_grpc,
    traces_pb2_grpc,
)

from server.app import GatewayServer
from server.config import RetrySettings, Settings

# Fast retries so tests about backoff take milliseconds, not seconds.
FAST_RETRY = RetrySettings(initial_delay=0.01, multiplier=2.0, jitter=0.0, max_delay=1.0, max_attempts=3)


@dataclasses.dataclass
class RunningGateway:
    server: GatewayServer
    channel: grpc.aio.Channel
    chat: chat_pb2_grpc.ChatCompletionServiceStub
    traces: traces_pb2_grpc.ProviderTraceServiceStub
    providers: providers_pb2_grpc.ProviderServiceStub
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "sqlite_path": str(tmp_path / "gateway.db"),
        "grace_period": 2.0,
        "retry": FAST_RETRY,
        "upstream_timeout": 10.0,
        "admin_listen": "",  # off: tests running side by side would fight over 127.0.0.1:9464
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_gateway(
    settings: Settings, server: GatewayServer | None = None
) -> AsyncIterator[RunningGateway]:
    server = server or GatewayServer(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield RunningGateway(
            server=server,
            channel=channel,
            chat=chat_pb2_grpc.ChatCompletionServiceStub(channel),
            traces=traces_pb2_grpc.ProviderTraceServiceStub(channel),
            providers=providers_pb2_grpc.ProviderServiceStub(channel),
            settings=settings,
        )
    finally:
        await channel.close()
        await server.stop(grace=1.0)


def chat_request(
    base_url: str,
    *messages: tuple[int, str],
    model: str = "gpt-4o-mini",
    context_window: int = 128_000,
    **fields: Any,
) -> chat_pb2.CreateRequest:
    """A CreateRequest for an OpenAI-compatible endpoint (default: one user message)."""
    msgs = [chat_pb2.Message(role=role, content=text) for role, text in messages] or [
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Say hello")
    ]
    llm_config = fields.pop("llm_config", None) or chat_pb2.LLMConfig(
        model=model, model_endpoint_type="openai", model_endpoint=base_url, context_window=context_window
    )
    return chat_pb2.CreateRequest(llm_config=llm_config, messages=msgs, **fields)
