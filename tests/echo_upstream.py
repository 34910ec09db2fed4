"""A loopback upstream that echoes the Authorization header it receives into its answers.

OpenAI-compatible `/v1/chat/completions` (unary; streamed one character per SSE chunk; in
tool-call arguments when the request has tools) and llama.cpp `/completion`. `mode` picks what
is echoed where: "answer" (the text), "error" (a 200 whose body is only an `error` naming the
key), "tool_name" (a tool call named after the key, with arguments that are not JSON).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class EchoUpstream:
    """OpenAI-compatible (`/v1/chat/completions`) and llama.cpp (`/completion`) servers that put
    the request's Authorization header into their answers."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.mode = "answer"
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/completion", self._llamacpp)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _echo(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization") or request.headers.get("api-key", "")
        self.authorizations.append(auth)
        return f"you sent {auth} ok"

    async def _sse(self, request: web.Request, events: list[Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())
            await asyncio.sleep(0)  # let each event go out on its own, as a slow model's would
        await response.write_eof()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        echo = self._echo(request)
        tools = bool(body.get("tools"))
        arguments = json.dumps({"message": echo})
        if self.mode == "error":
            return web.json_response({"error": {"message": "rejected", "code": echo}})
        if self.mode == "tool_name":
            call = {"id": "call_1", "type": "function", "function": {"name": echo, "arguments": "{not json"}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            return web.json_response({"id": "chatcmpl-echo", "model": "echo", "choices": [choice]})
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": echo, "reasoning_content": echo}
            if tools:
                message["tool_calls"] = [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "send_message", "arguments": arguments},
                    }
                ]
            return web.json_response(
                {
                    "id": echo,
                    "object": "chat.completion",
                    "created": 1,
                    "model": echo,
                    "system_fingerprint": echo,
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-echo",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "echo",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events: list[Any] = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"reasoning_content": c}) for c in echo]
        events += [chunk({"content": c}) for c in echo]
        if tools:
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "send_message", "arguments": ""},
                            }
                        ]
                    }
                )
            )
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": c}}]}) for c in arguments]
        events.append(chunk({}, "tool_calls" if tools else "stop"))
        events.append("[DONE]")
        return await self._sse(request, events)

    async def _llamacpp(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        echo = self._echo(request)
        if self.mode == "error":
            if body.get("stream"):
                return await self._sse(request, [{"error": echo}])
            return web.json_response({"error": echo})
        if not body.get("stream"):
            return web.json_response(
                {"content": echo, "stop": True, "tokens_evaluated": 3, "tokens_predicted": 3}
            )
        events: list[Any] = [{"content": c, "stop": False} for c in echo]
        events.append({"content": "", "stop": True, "tokens_evaluated": 3, "tokens_predicted": 3})
        return await self._sse(request, events)
