"""A gateway with auth on, three keys and traces holding script-injection payloads, for the console tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmgateway.v1 import chat_pb2

from server.auth.store_sqlite import SqliteAuthStore
from tests.fake_upstream import FakeUpstream, Reply, completion, tool_call
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway

SCRIPT = "<script>window.__xss=1</script>"
IMG = '"><img src=x onerror="window.__xss=2">'
TOOL_NAME = '"><img src=x onerror=window.__xss=3>'
TOOL_ARGS = {"query": "<script>window.__xss=4</script>", "html": IMG}


@dataclass
class Console:
    gw: RunningGateway
    port: int
    admin_key: str  # org-a, admin
    user_key: str  # org-a, user u1, not admin
    other_key: str  # org-b, admin
    traces: dict[str, str]  # name -> trace id


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@asynccontextmanager
async def console(tmp_path: Path, upstream: FakeUpstream, **overrides: Any) -> AsyncIterator[Console]:
    db = tmp_path / "gateway.db"
    async with SqliteAuthStore(path=str(db)) as store:
        _, admin_key = await store.create_key(organization_id="org-a", user_id="", is_admin=True)
        _, user_key = await store.create_key(organization_id="org-a", user_id="u1", is_admin=False)
        _, other_key = await store.create_key(organization_id="org-b", user_id="", is_admin=True)
    values: dict[str, Any] = {
        "auth": "required",
        "allowed_endpoints": (upstream.base_url,),
        "admin_listen": "127.0.0.1:0",
    }
    values.update(overrides)
    settings = make_settings(tmp_path, **values)
    async with running_gateway(settings) as gw:
        assert gw.server.admin is not None
        traces: dict[str, str] = {}
        # A conversation: system, user (with the payloads), an assistant tool call, its result;
        # the answer calls a tool whose name and arguments are payloads too.
        upstream.script(
            Reply(
                json_body=completion(
                    "Calling the tool.",
                    tool_calls=[tool_call(TOOL_NAME, TOOL_ARGS, "call_9")],
                    finish_reason="tool_calls",
                    reasoning_content="I should look it up first.",
                )
            )
        )
        request = chat_request(
            upstream.base_url,
            (chat_pb2.ROLE_SYSTEM, "You are a careful assistant."),
            (chat_pb2.ROLE_USER, f"Find {SCRIPT} and {IMG}"),
            model="console-model",
        )
        request.messages.append(
            chat_pb2.Message(
                role=chat_pb2.ROLE_ASSISTANT,
                content="",
                tool_calls=[chat_pb2.ToolCall(id="call_1", name="search", arguments='{"q": "weather"}')],
            )
        )
        request.messages.append(
            chat_pb2.Message(role=chat_pb2.ROLE_TOOL, content="sunny, 21C", tool_call_id="call_1")
        )
        request.trace.step_id = "step-xss"
        request.trace.run_id = "run-1"
        request.trace.agent_id = "agent-1"
        request.trace.tags.extend(["blue", IMG])
        answer = await gw.chat.Create(request, metadata=bearer(admin_key), timeout=10)
        traces["xss"] = answer.provider_trace_id
        for i in range(3):
            plain = chat_request(upstream.base_url, model="plain-model")
            plain.trace.step_id = f"step-plain-{i}"
            plain.trace.run_id = "run-2"
            answer = await gw.chat.Create(plain, metadata=bearer(admin_key), timeout=10)
            traces[f"plain-{i}"] = answer.provider_trace_id
        mine = chat_request(upstream.base_url, model="user-model")
        mine.trace.step_id = "step-user"
        answer = await gw.chat.Create(mine, metadata=bearer(user_key), timeout=10)
        traces["user"] = answer.provider_trace_id
        other = chat_request(upstream.base_url, model="other-org-model")
        other.trace.step_id = "step-other"
        answer = await gw.chat.Create(other, metadata=bearer(other_key), timeout=10)
        traces["other-org"] = answer.provider_trace_id
        await gw.server._running.writer.flush(timeout=10)  # type: ignore[union-attr]
        yield Console(gw, gw.server.admin.port, admin_key, user_key, other_key, traces)
