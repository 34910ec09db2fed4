"""Clients other than our own Python stubs, against the real server run as a subprocess.

`python -m server serve` runs as operators run it (tests/process_harness.py); the fake
OpenAI-compatible upstream runs in the test's event loop, so every blocking step (starting the
server, running grpcurl, buf or node) goes through `asyncio.to_thread`.

* grpcurl 1.8 through server reflection alone: list, describe, Create, StreamCreate, health, errors.
* A Node.js client (@grpc/grpc-js + @grpc/proto-loader) built from the .proto files.
* `buf curl` over gRPC with reflection, and with the proto module as the schema.
* Graceful shutdown on SIGTERM and SIGINT: in-flight streams finish, new calls are refused,
  health turns NOT_SERVING, exit 0 within the grace period.
* `llm-gateway serve --help` and the Dockerfile (parsed; its HEALTHCHECK run for real).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion, text_stream, tool_call, usage_chunk
from tests.integration.test_hardening_shutdown import error_reason
from tests.process_harness import (
    REPO_ROOT,
    async_server_process,
    clean_env,
    health_status,
    server_process,
    start_server_process,
    tool_path,
)

NODE_DIR = REPO_ROOT / "tests" / "node"
CHAT_SERVICE = "llmgateway.v1.ChatCompletionService"
# grpcurl exits 64 + the gRPC status code when the call fails.
GRPCURL_STATUS_BASE = 64


# ----------------------------------------------------------------------------------------------
# helpers


async def run(
    args: list[str], *, timeout: float = 60, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command without blocking the event loop (the fake upstream must keep answering)."""
    return await asyncio.to_thread(
        subprocess.run,
        args,
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def json_stream(text: str) -> list[Any]:
    """The JSON values of a stream of concatenated (pretty-printed) JSON documents."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    text = text.strip()
    while pos < len(text):
        value, end = decoder.raw_decode(text, pos)
        values.append(value)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return values


def all_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        keys = set(value)
        for item in value.values():
            keys |= all_keys(item)
        return keys
    if isinstance(value, list):
        return set().union(*(all_keys(item) for item in value)) if value else set()
    return set()


def lower_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def camel_keys(value: Any) -> Any:
    """protojson field names as the contract promises them ."""
    if isinstance(value, dict):
        return {lower_camel(k): camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


def request_json(upstream_url: str, **extra: Any) -> dict[str, Any]:
    """A CreateRequest in protojson, the way a grpcurl user types it."""
    body: dict[str, Any] = {
        "llmConfig": {
            "model": "gpt-4o-mini",
            "modelEndpointType": "openai",
            "modelEndpoint": upstream_url,
            "contextWindow": 128000,
        },
        "messages": [{"role": "ROLE_USER", "content": "Say hello"}],
    }
    body.update(extra)
    return body


def tool_stream_events() -> list[dict[str, Any] | str]:
    """SSE for an answer with reasoning, text and one tool call split into fragments."""
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "User wants "}),
        chunk({"reasoning_content": "the weather."}),
        chunk({"content": "Checking "}),
        chunk({"content": "now."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_w1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(prompt=20, completion_tokens=7),
        "[DONE]",
    ]


# ----------------------------------------------------------------------------------------------
# 1. grpcurl through reflection alone


async def test_grpcurl_list_and_describe_through_reflection(tmp_path: Path) -> None:
    async with async_server_process(tmp_path) as server:
        listed = await run([tool_path("grpcurl"), "-plaintext", server.address, "list"])
        assert listed.returncode == 0, listed.stderr
        services = set(listed.stdout.split())
        assert {
            CHAT_SERVICE,
            "llmgateway.v1.ProviderTraceService",
            "llmgateway.v1.ProviderService",
            "grpc.health.v1.Health",
        } <= services, listed.stdout

        service = await run([tool_path("grpcurl"), "-plaintext", server.address, "describe", CHAT_SERVICE])
        assert service.returncode == 0, service.stderr
        assert f"{CHAT_SERVICE} is a service:" in service.stdout
        for rpc in (
            "rpc Create ( .llmgateway.v1.CreateRequest ) returns ( .llmgateway.v1.CreateResponse );",
            "rpc StreamCreate ( .llmgateway.v1.StreamCreateRequest ) returns "
            "( stream .llmgateway.v1.StreamCreateResponse );",
            "rpc CountTokens ( .llmgateway.v1.CountTokensRequest ) returns "
            "( .llmgateway.v1.CountTokensResponse );",
        ):
            assert rpc in service.stdout, service.stdout

        message = await run(
            [tool_path("grpcurl"), "-plaintext", server.address, "describe", "llmgateway.v1.CreateRequest"]
        )
        assert message.returncode == 0, message.stderr
        assert "llmgateway.v1.CreateRequest is a message:" in message.stdout
        for field in (
            ".llmgateway.v1.LLMConfig llm_config = 1;",
            "repeated .llmgateway.v1.Message messages = 2;",
            "repeated .llmgateway.v1.FunctionDefinition functions = 3;",
            "optional bool use_tool_naming = 6;",
            ".llmgateway.v1.TraceContext trace = 11;",
        ):
            assert field in message.stdout, message.stdout

        # Imported well-known types resolve through reflection as well.
        struct = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                server.address,
                "describe",
                "llmgateway.v1.FunctionDefinition",
            ]
        )
        assert struct.returncode == 0, struct.stderr
        assert ".google.protobuf.Struct parameters = 3;" in struct.stdout


async def test_grpcurl_create_returns_protojson(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.script(Reply(json_body=completion("Hello from grpcurl", reasoning_content="Greet back.")))
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        result = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                "-max-time",
                "30",
                "-d",
                json.dumps(request_json(upstream.base_url, trace={"stepId": "step-grpcurl"})),
                server.address,
                f"{CHAT_SERVICE}/Create",
            ]
        )
    assert result.returncode == 0, result.stderr
    # protojson: enums by name, int64 as strings, defaults omitted (names: see the next test).
    response = camel_keys(json.loads(result.stdout))
    c = response["completion"]
    assert c["id"] == "chatcmpl-abc123"
    assert c["model"] == "gpt-4o-mini-2024-07-18"
    assert c["created"] == "1732000000"
    assert c["systemFingerprint"] == "fp_test"
    choice = c["choices"][0]
    assert choice["message"]["role"] == "ROLE_ASSISTANT"
    assert choice["message"]["content"] == "Hello from grpcurl"
    assert choice["message"]["reasoningContent"] == "Greet back."
    assert choice["finishReason"] == "FINISH_REASON_STOP"
    assert c["usage"] == {
        "promptTokens": 12,
        "completionTokens": 3,
        "totalTokens": 15,
        "cachedTokens": 4,
        "reasoningTokens": 1,
        # gpt-4o-mini: 8 uncached x $0.15/M + 4 cached x $0.075/M + 3 out x $0.60/M (issue 17)
        "costUsd": "0.0000033",
    }
    assert response["providerTraceId"].startswith("provider_trace-")
    sent = upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_grpcurl_prints_lower_camel_case_field_names(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(json_body=completion("Hi", reasoning_content="Thinking.")), Reply(sse=tool_stream_events())
    )
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        created = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                "-max-time",
                "30",
                "-d",
                json.dumps(request_json(upstream.base_url)),
                server.address,
                f"{CHAT_SERVICE}/Create",
            ]
        )
        streamed = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                "-max-time",
                "30",
                "-d",
                json.dumps(request_json(upstream.base_url)),
                server.address,
                f"{CHAT_SERVICE}/StreamCreate",
            ]
        )
    assert created.returncode == 0 and streamed.returncode == 0, created.stderr + streamed.stderr
    values = [json.loads(created.stdout), *json_stream(streamed.stdout)]
    snake = {k for k in all_keys(values) if "_" in k and not k.startswith("@")}
    assert not snake, f"snake_case names in grpcurl's protojson: {sorted(snake)}"
    assert {"providerTraceId", "finishReason", "promptTokens", "reasoningContent"} <= all_keys(values)


async def test_grpcurl_stream_create_prints_deltas_then_completion(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=tool_stream_events()))
    body = request_json(
        upstream.base_url,
        functions=[
            {
                "name": "get_weather",
                "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
    )
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        result = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                "-max-time",
                "30",
                "-d",
                json.dumps(body),
                server.address,
                f"{CHAT_SERVICE}/StreamCreate",
            ]
        )
    assert result.returncode == 0, result.stderr
    events = camel_keys(json_stream(result.stdout))
    assert len(events) >= 3
    *deltas, last = events
    assert all(set(e) <= {"delta", "providerTraceId"} and "delta" in e for e in deltas), events
    assert "completion" in last, events
    assert "".join(e["delta"].get("content", "") for e in deltas) == "Checking now."
    assert "".join(e["delta"].get("reasoningContent", "") for e in deltas) == "User wants the weather."
    fragments = [tc for e in deltas for tc in e["delta"].get("toolCalls", [])]
    assert "".join(tc.get("arguments", "") for tc in fragments) == '{"city": "Paris"}'
    assert {tc.get("name") for tc in fragments} >= {"get_weather"}
    assert any(e["delta"].get("finishReason") == "FINISH_REASON_TOOL_CALLS" for e in deltas)

    completion_ = last["completion"]
    message = completion_["choices"][0]["message"]
    assert message["content"] == "Checking now."
    assert message["reasoningContent"] == "User wants the weather."
    assert message["toolCalls"] == [
        {"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert completion_["choices"][0]["finishReason"] == "FINISH_REASON_TOOL_CALLS"
    assert completion_["usage"]["promptTokens"] == 20
    assert completion_["usage"]["completionTokens"] == 7
    assert completion_["usage"]["totalTokens"] == 27
    assert last["providerTraceId"].startswith("provider_trace-")
    assert upstream.requests[0].body["stream"] is True


async def test_grpcurl_health_check(tmp_path: Path) -> None:
    async with async_server_process(tmp_path) as server:
        overall = await run(
            [tool_path("grpcurl"), "-plaintext", server.address, "grpc.health.v1.Health/Check"]
        )
        assert overall.returncode == 0, overall.stderr
        assert json.loads(overall.stdout) == {"status": "SERVING"}
        for service in (CHAT_SERVICE, "llmgateway.v1.ProviderTraceService", "llmgateway.v1.ProviderService"):
            one = await run(
                [
                    tool_path("grpcurl"),
                    "-plaintext",
                    "-d",
                    json.dumps({"service": service}),
                    server.address,
                    "grpc.health.v1.Health/Check",
                ]
            )
            assert one.returncode == 0, one.stderr
            assert json.loads(one.stdout) == {"status": "SERVING"}, service


async def test_grpcurl_invalid_request_prints_code_and_details(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    body = request_json(upstream.base_url)
    body["messages"] = []
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        result = await run(
            [
                tool_path("grpcurl"),
                "-plaintext",
                "-max-time",
                "30",
                "-d",
                json.dumps(body),
                server.address,
                f"{CHAT_SERVICE}/Create",
            ]
        )
    assert result.returncode == GRPCURL_STATUS_BASE + grpc.StatusCode.INVALID_ARGUMENT.value[0], result
    output = result.stdout + result.stderr
    assert "Code: InvalidArgument" in output, output
    assert "messages" in output
    assert "google.rpc.ErrorInfo" in output and '"domain":"llmgateway"' in output.replace(" ", "")
    assert '"reason":"INVALID_REQUEST"' in output.replace(" ", ""), output
    assert "google.rpc.BadRequest" in output
    assert not upstream.requests


# ----------------------------------------------------------------------------------------------
# 2. Node.js client from the .proto files


async def ensure_node_modules() -> None:
    """Install tests/node's packages when `make node-deps` has not (never skip the test)."""
    wanted = [
        NODE_DIR / "node_modules" / "@grpc" / name / "package.json" for name in ("grpc-js", "proto-loader")
    ]
    if all(path.exists() for path in wanted):
        return
    npm = [
        os.environ.get("NPM", "npm"),
        "ci" if (NODE_DIR / "package-lock.json").exists() else "install",
        "--no-audit",
        "--no-fund",
    ]
    result = await run(npm, cwd=NODE_DIR, timeout=280, env={**os.environ})
    assert result.returncode == 0, f"{shlex.join(npm)} failed:\n{result.stdout}\n{result.stderr}"
    (NODE_DIR / "node_modules" / ".installed-stamp").touch()


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_node_client_create_and_stream_create(tmp_path: Path, upstream: FakeUpstream) -> None:
    await ensure_node_modules()
    upstream.script(
        Reply(
            json_body=completion(
                "Let me check.",
                tool_calls=[tool_call("get_weather", {"city": "Paris"})],
                finish_reason="tool_calls",
            )
        ),
        Reply(sse=tool_stream_events()),
    )
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        result = await run(
            [os.environ.get("NODE", "node"), str(NODE_DIR / "client.mjs"), server.address, upstream.base_url],
            timeout=90,
        )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = json.loads(result.stdout)

    # Create: content, tool calls, finish reason, usage; int64 as a string (longs: String).
    created = out["create"]
    c = created["completion"]
    message = c["choices"][0]["message"]
    assert message["role"] == "ROLE_ASSISTANT"
    assert message["content"] == "Let me check."
    assert [(t["id"], t["name"], json.loads(t["arguments"])) for t in message["toolCalls"]] == [
        ("call_1", "get_weather", {"city": "Paris"})
    ]
    assert c["choices"][0]["finishReason"] == "FINISH_REASON_TOOL_CALLS"
    assert c["created"] == "1732000000"
    assert {
        k: c["usage"][k]
        for k in ("promptTokens", "completionTokens", "totalTokens", "cachedTokens", "reasoningTokens")
    } == {
        "promptTokens": 12,
        "completionTokens": 3,
        "totalTokens": 15,
        "cachedTokens": 4,
        "reasoningTokens": 1,
    }
    assert created["providerTraceId"].startswith("provider_trace-")
    # What the Node request became upstream: the Struct schema arrived as plain JSON Schema.
    sent = upstream.requests[0].body
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["name"] == "alice"
    function = sent["tools"][0]["function"]
    assert function["name"] == "get_weather"
    assert function["parameters"]["properties"]["city"] == {"type": "string", "description": "City name"}
    # `days` is optional: strict form makes it required and nullable (the gateway drops the null again).
    assert function["parameters"]["properties"]["days"] == {"type": ["integer", "null"]}
    assert "city" in function["parameters"]["required"]
    assert sent["tool_choice"] == "auto"
    assert sent["temperature"] == 0.2

    # StreamCreate: deltas, then exactly one completion, last.
    events = out["stream"]
    kinds = [e["event"] for e in events]
    assert kinds.count("completion") == 1 and kinds[-1] == "completion", kinds
    assert set(kinds[:-1]) == {"delta"}
    deltas = [e["delta"] for e in events[:-1]]
    assert "".join(d["content"] for d in deltas) == "Checking now."
    assert "".join(d["reasoningContent"] for d in deltas) == "User wants the weather."
    fragments = [tc for d in deltas for tc in d["toolCalls"]]
    assert {tc["index"] for tc in fragments} == {0}
    assert "".join(tc["arguments"] for tc in fragments) == '{"city": "Paris"}'
    final = events[-1]["completion"]
    final_message = final["choices"][0]["message"]
    assert final_message["content"] == "Checking now."
    assert final_message["reasoningContent"] == "User wants the weather."
    assert [(t["id"], t["name"], t["arguments"]) for t in final_message["toolCalls"]] == [
        ("call_w1", "get_weather", '{"city": "Paris"}')
    ]
    assert final["choices"][0]["finishReason"] == "FINISH_REASON_TOOL_CALLS"
    assert (
        final["usage"]["promptTokens"],
        final["usage"]["completionTokens"],
        final["usage"]["totalTokens"],
    ) == (20, 7, 27)
    assert events[-1]["providerTraceId"].startswith("provider_trace-")
    streamed = upstream.requests[1].body
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}

    # Errors reach Node with their code and the google.rpc.Status trailer.
    assert out["invalid"]["codeName"] == "INVALID_ARGUMENT", out["invalid"]
    assert "message" in out["invalid"]["details"]
    assert out["invalid"]["hasStatusDetails"] is True

    # CountTokens answers without calling the upstream.
    counted = out["countTokens"]
    assert counted["promptTokens"] > 0 and counted["totalTokens"] >= counted["promptTokens"]
    assert counted["contextWindow"] == 128000
    assert counted["encoding"] == "o200k_base"  # gpt-4o family, bundled offline
    assert len(upstream.requests) == 2


# ----------------------------------------------------------------------------------------------
# 3. buf curl


def buf_env(tmp_path: Path) -> dict[str, str]:
    return clean_env({"BUF_CACHE_DIR": str(tmp_path / "buf-cache"), "HOME": str(tmp_path)})


@pytest.mark.parametrize("schema", ["reflection", "proto"])
async def test_buf_curl_create(tmp_path: Path, upstream: FakeUpstream, schema: str) -> None:
    upstream.script(Reply(json_body=completion(f"Hello, buf ({schema})")))
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        args = [tool_path("buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "30s"]
        if schema == "proto":
            args += ["--schema", str(REPO_ROOT / "proto")]
        args += [
            "-d",
            json.dumps(request_json(upstream.base_url)),
            f"http://{server.address}/{CHAT_SERVICE}/Create",
        ]
        result = await run(args, env=buf_env(tmp_path))
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout}\n{result.stderr}"
    response = json.loads(result.stdout)
    assert response["completion"]["choices"][0]["message"]["content"] == f"Hello, buf ({schema})"
    assert response["completion"]["usage"]["totalTokens"] == 15
    assert response["providerTraceId"].startswith("provider_trace-")


async def test_buf_curl_lists_services_through_v1_reflection(tmp_path: Path) -> None:
    async with async_server_process(tmp_path) as server:
        args = [
            tool_path("buf"),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--list-services",
            f"http://{server.address}",
        ]
        result = await run(args, env=buf_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert {
        CHAT_SERVICE,
        "llmgateway.v1.ProviderTraceService",
        "llmgateway.v1.ProviderService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(result.stdout.split()), result.stdout


async def test_buf_curl_stream_create_and_error(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.script(Reply(sse=text_stream(["Hi", " from", " buf"])))
    async with async_server_process(tmp_path, allowed_endpoints=[upstream.base_url]) as server:
        base = [tool_path("buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "30s"]
        streamed = await run(
            [
                *base,
                "-d",
                json.dumps(request_json(upstream.base_url)),
                f"http://{server.address}/{CHAT_SERVICE}/StreamCreate",
            ],
            env=buf_env(tmp_path),
        )
        body = request_json(upstream.base_url)
        body["messages"] = []
        failed = await run(
            [*base, "-d", json.dumps(body), f"http://{server.address}/{CHAT_SERVICE}/Create"],
            env=buf_env(tmp_path),
        )
    assert streamed.returncode == 0, streamed.stderr
    events = json_stream(streamed.stdout)
    assert "".join(e["delta"].get("content", "") for e in events[:-1]) == "Hi from buf"
    assert events[-1]["completion"]["choices"][0]["message"]["content"] == "Hi from buf"
    assert failed.returncode != 0
    error = json.loads(failed.stderr)
    assert error["code"] == "invalid_argument", failed.stderr
    assert {d["type"] for d in error["details"]} >= {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}


# ----------------------------------------------------------------------------------------------
# 4. graceful shutdown


def stream_request(upstream_url: str) -> chat_pb2.StreamCreateRequest:
    return chat_pb2.StreamCreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint=upstream_url,
            context_window=128000,
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Count slowly")],
    )


async def wait_not_serving(watch: Any) -> list[int]:
    """Statuses seen on a Health/Watch stream until NOT_SERVING (the stream then gets cancelled)."""
    seen = []
    while (response := await watch.read()) is not grpc.aio.EOF:
        seen.append(response.status)
        if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
    return seen


# How a new call made during the drain may fail: refused by the gateway (its ErrorInfo), or, once
# grpc's stop began, its connection refused (the listener closed). Never grpc's bare CANCELLED:
# the gateway refuses health checks once the calls queued at the signal have started, and lets
# grpc stop only once no call came for 0.25 s.
REFUSED_BY_GATEWAY = "UNAVAILABLE SHUTTING_DOWN"
CONNECT_REFUSED = "UNAVAILABLE connection refused"
# A checker told UNAVAILABLE waits this long before it looks again (longer than that quiet).
PAUSE_AFTER_REFUSAL = 1.0


def drain_outcome(error: grpc.aio.AioRpcError) -> str:
    """The code and ErrorInfo reason, or CONNECT_REFUSED for a connection the server refused;
    with grpc's message when there is no ErrorInfo (a bare status: which one it was)."""
    reason = error_reason(error)
    if reason is not None:
        return f"{error.code().name} {reason}"
    if error.code() == grpc.StatusCode.UNAVAILABLE and "Connection refused" in (error.details() or ""):
        return CONNECT_REFUSED
    return f"{error.code().name} None {error.details()!r}"


async def checks_until_port_closed(address: str, timeout: float = 5.0) -> list[str]:
    """Health checks on fresh channels, as a checker makes them, until the port is closed: what
    each got. NOT_SERVING while the calls queued at the signal start, then the gateway's refusal
    (the checker pauses after each), then the closed port."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while not seen or seen[-1] != CONNECT_REFUSED:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
            except grpc.aio.AioRpcError as exc:
                seen.append(drain_outcome(exc))
        assert time.monotonic() < deadline, f"the port was still open long after the signal: {seen}"
        await asyncio.sleep(PAUSE_AFTER_REFUSAL if seen[-1] == REFUSED_BY_GATEWAY else 0.02)
    return seen


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_stream_refuses_new_calls_and_exits_zero(
    tmp_path: Path, upstream: FakeUpstream, signum: signal.Signals
) -> None:
    grace = 10.0
    words = [f"w{i} " for i in range(32)]
    chunk_delay = 0.15  # ~5 s of streaming: the port closes ~2 s after the signal, before it ends
    upstream.script(Reply(sse=text_stream(words), chunk_delay=chunk_delay))
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        extra_args=["--grace-period", str(grace)],
    )
    signalled_at: float | None = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            stream = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                stream_request(upstream.base_url), timeout=30
            )
            events = [await stream.read()]
            assert events[0].WhichOneof("event") == "delta"

            signalled_at = time.monotonic()
            server.send_signal(signum)

            # Health turns NOT_SERVING (seen on the Watch opened before the signal) ...
            seen = await asyncio.wait_for(wait_not_serving(watch), timeout=5)
            assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            # ... health checks are refused, then the port closes, while the stream still runs ...
            checks = await checks_until_port_closed(server.address)
            phases = [c for i, c in enumerate(checks) if i == 0 or checks[i - 1] != c]
            # In this order, each phase possibly missed by a checker slower than it lasts.
            order = ["NOT_SERVING", REFUSED_BY_GATEWAY, CONNECT_REFUSED]
            assert set(phases) <= set(order), (phases, len(checks))
            assert phases == sorted(phases, key=order.index) and phases[-1] == CONNECT_REFUSED, checks
            async with grpc.aio.insecure_channel(server.address) as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as refused_create:
                    await chat_pb2_grpc.ChatCompletionServiceStub(fresh).Create(
                        chat_pb2.CreateRequest(
                            llm_config=stream_request(upstream.base_url).llm_config,
                            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="too late")],
                        ),
                        timeout=5,
                    )
                assert drain_outcome(refused_create.value) == CONNECT_REFUSED, refused_create.value
            assert stream.done() is False, "the in-flight stream ended before new calls were checked"

            # ... and the in-flight stream finishes normally with its completion.
            while (event := await stream.read()) is not grpc.aio.EOF:
                events.append(event)
            assert await stream.code() == grpc.StatusCode.OK
    finally:
        if signalled_at is None:  # failed before the signal: just stop the server
            await asyncio.to_thread(server.stop)
        try:
            exit_code = await asyncio.to_thread(server.wait, grace + 10)
        finally:
            server.close()
    assert signalled_at is not None
    exited_after = time.monotonic() - signalled_at

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("completion") == 1 and kinds[-1] == "completion", kinds
    assert "".join(e.delta.content for e in events[:-1]) == "".join(words)
    final = events[-1].completion
    assert final.choices[0].message.content == "".join(words)
    assert final.choices[0].finish_reason == chat_pb2.FINISH_REASON_STOP
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (20, 7)
    assert exit_code == 0, server.log
    assert exited_after < grace, f"exit took {exited_after:.1f} s (grace {grace} s)"
    assert "shutting down" in server.log
    # Only the stream reached the upstream; the refused Create never did.
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_exits_zero_promptly(tmp_path: Path, signum: signal.Signals) -> None:
    server = start_server_process(tmp_path)
    started = time.monotonic()
    code = server.stop(signum, timeout=15)
    assert code == 0, server.log
    assert time.monotonic() - started < 5, server.log
    with pytest.raises(grpc.RpcError) as refused:
        health_status(server.address, timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------------------------
# 5. the command line

# The contract's configuration names, each a flag of `llm-gateway serve`.
CONTRACT_SETTINGS = (
    "LISTEN",
    "WORKERS",
    "TRACE_BACKENDS",
    "SQLITE_PATH",
    "POSTGRES_DSN",
    "CLICKHOUSE_URL",
    "TRACE_SOCKET",
    "OPENAI_BASE_URL",
    "ALLOWED_ENDPOINTS",
    "ENCRYPTION_KEY",
    "AUTH",
)


@pytest.mark.parametrize("entry", ["llm-gateway", "python -m server"])
def test_serve_help_lists_the_contract_flags(entry: str) -> None:
    command = [tool_path("llm-gateway")] if entry == "llm-gateway" else [sys.executable, "-m", "server"]
    result = subprocess.run(
        [*command, "serve", "--help"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for name in CONTRACT_SETTINGS:
        flag = "--" + name.lower().replace("_", "-")
        assert re.search(rf"(^|[\s\[]){re.escape(flag)}\b", help_text), (
            f"{flag} missing from:\n{result.stdout}"
        )
        assert f"LLMGW_{name}" in help_text, f"LLMGW_{name} missing from:\n{result.stdout}"


# ----------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: parse it, and run its HEALTHCHECK for real)

DOCKERFILE = REPO_ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, `\\` continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def env_values(instructions: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, sep, value = token.partition("=")
                assert sep, f"use ENV NAME=value, not the legacy form: ENV {rest}"
                values[name] = value
    return values


def healthcheck_command() -> list[str]:
    (rest,) = [rest for keyword, rest in runtime_stage() if keyword == "HEALTHCHECK"]
    _, _, command = rest.partition("CMD ")
    parsed = json.loads(command)  # exec form: a JSON array, or Docker would run it through a shell
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)
    return parsed


def test_dockerfile_runs_non_root_with_health_check_on_all_interfaces() -> None:
    known = {
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    }
    instructions = dockerfile_instructions()
    assert {keyword for keyword, _ in instructions} <= known
    assert instructions[0][0] in ("FROM", "ARG")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert all(rest.split()[0].startswith("python:3.11-slim") for rest in froms), froms

    stage = runtime_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    env = env_values(stage)
    assert env["LLMGW_LISTEN"] == "0.0.0.0:50051"
    assert any(keyword == "EXPOSE" and "50051" in rest.split() for keyword, rest in stage)
    assert healthcheck_command()[0] == "python"

    entrypoint = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    cmd = [json.loads(rest) for keyword, rest in stage if keyword == "CMD"]
    assert (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else []) == ["llm-gateway", "serve"]

    # Everything COPY'd from the build context exists and is not excluded by .dockerignore.
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: missing from the repository"
                assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, (
                    f"COPY {source}: .dockerignore does not let it into the build context"
                )
    # The operator must know that auto auth on 0.0.0.0 needs a key (or LLMGW_AUTH=off).
    text = DOCKERFILE.read_text()
    assert "keys create" in text and "LLMGW_AUTH=off" in text


def test_dockerfile_healthcheck_command_works(tmp_path: Path) -> None:
    command = healthcheck_command()
    python = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    with server_process(tmp_path) as server:
        ok = subprocess.run(
            python,
            env=clean_env({"LLMGW_LISTEN": f"0.0.0.0:{server.port}"}),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        python,
        env=clean_env({"LLMGW_LISTEN": f"0.0.0.0:{server.port}"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode != 0


def image_env(tmp_path: Path) -> dict[str, str]:
    """The image's environment (listen on all interfaces, auth auto), on a free port and a temp store."""
    env = env_values(runtime_stage())
    return {
        "LLMGW_LISTEN": env["LLMGW_LISTEN"].rsplit(":", 1)[0] + ":0",
        "LLMGW_SQLITE_PATH": str(tmp_path / "image.db"),
    }


def test_image_defaults_without_keys_refuse_to_start(tmp_path: Path) -> None:
    """As the Dockerfile documents: auto auth beyond loopback with no key exits 2 with advice."""
    process = subprocess.Popen(
        [tool_path("llm-gateway"), "serve"],
        cwd=tmp_path,
        env=clean_env(image_env(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"the server logged why it cannot start but did not exit:\n{stderr}") from None
    finally:
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == 2, stderr
    assert "no gateway key" in stderr and "keys create" in stderr


def test_image_defaults_with_a_key_require_it(tmp_path: Path) -> None:
    """The Dockerfile's recipe: `llm-gateway keys create --org acme --admin`, then serve with auth on."""
    env = image_env(tmp_path)
    created = subprocess.run(
        [tool_path("llm-gateway"), "keys", "create", "--org", "acme", "--admin"],
        cwd=tmp_path,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    server = start_server_process(
        tmp_path,
        listen=env["LLMGW_LISTEN"],
        env=env,
        sqlite_path=Path(env["LLMGW_SQLITE_PATH"]),
        command=[tool_path("llm-gateway")],
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            request = chat_pb2.CountTokensRequest(
                llm_config=chat_pb2.LLMConfig(
                    model="gpt-4o-mini",
                    model_endpoint_type="openai",
                    model_endpoint="https://api.openai.com/v1",
                    context_window=8000,
                ),
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
            )
            with pytest.raises(grpc.RpcError) as anonymous:
                chat.CountTokens(request, timeout=10)
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
            counted = chat.CountTokens(request, timeout=10, metadata=[("authorization", f"Bearer {key}")])
            assert counted.total_tokens > 0
    finally:
        assert server.stop() == 0, server.log
