"""A fake OpenAI-compatible upstream: a real aiohttp server on loopback, scripted per test.

Each incoming request is recorded (path, headers, JSON body) and answered by the next scripted
`Reply` (or the default completion). Payload shapes follow what OpenAI, vLLM, OpenRouter and
DeepSeek send: JSON completions, SSE chunks with tool-call fragments, reasoning_content, a final
usage chunk, keep-alive comments and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def completion(
    content: str | None = "Hello!",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str = "stop",
    model: str = "gpt-4o-mini-2024-07-18",
    usage: dict[str, Any] | None = None,
    reasoning_content: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1732000000,
        "model": model,
        "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage
        or {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 1, "audio_tokens": 0},
        },
    }


def tool_call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_1") -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def chunk(delta: dict[str, Any], *, finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream1",
        "object": "chat.completion.chunk",
        "created": 1732000001,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_test",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(prompt: int = 20, completion_tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream1",
        "object": "chat.completion.chunk",
        "created": 1732000001,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }


def text_stream(words: list[str], *, usage: bool = True) -> list[dict[str, Any] | str]:
    """SSE events for a plain text answer, the way OpenAI sends them."""
    events: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in words]
    events.append(chunk({}, finish_reason="stop"))
    if usage:
        events.append(usage_chunk())
    events.append("[DONE]")
    return events


@dataclass
class Reply:
    """One scripted answer. `sse` events are dicts (sent as JSON) or raw strings (sent as data)."""

    status: int = 200
    json_body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    sse: list[dict[str, Any] | str] | None = None
    sse_raw: bytes | None = None  # exact bytes of an SSE body (keep-alives, odd framing)
    delay: float = 0.0  # before answering
    chunk_delay: float = 0.0  # between SSE events
    hang: bool = False  # accept and never answer
    break_after: int | None = None  # close the connection after this many SSE events
    content_type: str | None = None
    reset: bool = False  # close the connection without answering anything
    hang_after: int | None = None  # after this many SSE events, keep the connection open and go silent


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    at: float = field(default_factory=time.monotonic)  # when the request arrived


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply(json_body=completion())
        self.disconnects = 0  # requests whose client went away before the answer finished
        self.disconnected = asyncio.Event()
        self.in_flight = 0  # requests being answered right now
        self.arrived = asyncio.Event()  # set at each request (tests clear it to wait for the next)
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `host:port` (0: any free port); OSError when it is taken."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away cancels its handler, so `disconnected` is
        # observable even while a reply hangs.
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.1, handler_cancellation=True
        )
        await self._runner.setup()
        self.host = host
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(Recorded(request.path, dict(request.headers), body, raw))
        self.arrived.set()
        reply = self.replies.popleft() if self.replies else self.default
        if reply is self.default and isinstance(body, dict) and not body.get("stream"):
            reply = _forced_reply(body) or reply  # as OpenAI: a forced function is called
        self.in_flight += 1
        try:
            return await self._answer(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.reset:
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(3600)  # the handler is cancelled as the connection goes
        if reply.hang:
            await asyncio.Event().wait()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.sse is not None or reply.sse_raw is not None:
            response = web.StreamResponse(
                status=reply.status, headers={"Content-Type": "text/event-stream", **reply.headers}
            )
            await response.prepare(request)
            if reply.sse_raw is not None:
                await response.write(reply.sse_raw)
            for n, event in enumerate(reply.sse or ()):
                if reply.break_after is not None and n >= reply.break_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if reply.hang_after is not None and n >= reply.hang_after:
                    await asyncio.Event().wait()
                data = event if isinstance(event, str) else json.dumps(event)
                await response.write(f"data: {data}\n\n".encode())
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            await response.write_eof()
            return response
        if reply.raw is not None:
            return web.Response(
                status=reply.status,
                body=reply.raw,
                headers=reply.headers,
                content_type=reply.content_type or "text/plain",
            )
        return web.json_response(
            reply.json_body if reply.json_body is not None else {}, status=reply.status, headers=reply.headers
        )


def _forced_reply(body: dict[str, Any]) -> Reply | None:
    """The default answer to a request forcing one function, or requiring a call
    (`tool_choice: "required"`): a call of it, or of the first tool (as OpenAI honours both)."""
    choice = body.get("tool_choice", body.get("function_call"))
    name = ""
    if isinstance(choice, dict):
        name = str((choice.get("function") or choice).get("name") or "")
    elif choice == "required" and isinstance(body.get("tools"), list) and body["tools"]:
        first = body["tools"][0]
        name = str(((first.get("function") or {}) if isinstance(first, dict) else {}).get("name") or "")
    if not name:
        return None
    call = tool_call(name, {}, "call_forced")
    return Reply(json_body=completion(None, tool_calls=[call], finish_reason="tool_calls"))
