"""A fake Anthropic Messages API: a real aiohttp server on loopback, scripted per test.

Every request is recorded (path, headers, JSON body) and answered by the next scripted `Reply`
(or the default message). The payloads are the documented ones: a `message` object, the SSE
sequence `message_start`, `content_block_start/delta/stop`, `message_delta`, `message_stop`
with `ping`s anywhere (each `event: <name>\\ndata: <json>\\n\\n`), error bodies
`{"type": "error", "error": {"type", "message"}, "request_id"}`, `request-id`, `retry-after`
and `anthropic-ratelimit-*` headers, and 529 overloaded_error. The official `anthropic` SDK
parses all of it (tests/integration/test_anthropic_fake_sdk.py), so it cannot drift from the
real API.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "claude-sonnet-4-5-20250929"
REQUEST_ID = "req_011CTestFake"
Event = tuple[str, dict[str, Any]]


def usage(
    input_tokens: int = 25, output_tokens: int = 12, *, cache_read: int = 0, cache_write: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message(
    content: list[dict[str, Any]] | None = None,
    *,
    stop_reason: str = "end_turn",
    model: str = MODEL,
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content if content is not None else [{"type": "text", "text": "Hello!"}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage_ or usage(),
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(name: str, tool_input: dict[str, Any], block_id: str = "toolu_01A") -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": tool_input}


def thinking_block(thinking: str, signature: str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3h") -> dict[str, Any]:
    return {"type": "thinking", "thinking": thinking, "signature": signature}


def error_body(error_type: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": text}, "request_id": REQUEST_ID}


# -- SSE sequences, as the streaming documentation shows them ----------------------------------


def message_start(input_tokens: int = 25, *, cache_read: int = 0, cache_write: int = 0) -> Event:
    start = message([], usage_=usage(input_tokens, 1, cache_read=cache_read, cache_write=cache_write))
    start["stop_reason"] = None
    return ("message_start", {"type": "message_start", "message": start})


def block_start(index: int, block: dict[str, Any]) -> Event:
    return ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def block_delta(index: int, delta: dict[str, Any]) -> Event:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> Event:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str, output_tokens: int, **usage_fields: int) -> Event:
    return (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens, **usage_fields},
        },
    )


PING: Event = ("ping", {"type": "ping"})
MESSAGE_STOP: Event = ("message_stop", {"type": "message_stop"})


def text_events(index: int, pieces: list[str]) -> list[Event]:
    return [
        block_start(index, {"type": "text", "text": ""}),
        *(block_delta(index, {"type": "text_delta", "text": p}) for p in pieces),
        block_stop(index),
    ]


def tool_events(index: int, name: str, block_id: str, fragments: list[str]) -> list[Event]:
    return [
        block_start(index, {"type": "tool_use", "id": block_id, "name": name, "input": {}}),
        *(block_delta(index, {"type": "input_json_delta", "partial_json": f}) for f in fragments),
        block_stop(index),
    ]


def thinking_events(index: int, pieces: list[str], signature: str) -> list[Event]:
    return [
        block_start(index, {"type": "thinking", "thinking": "", "signature": ""}),
        *(block_delta(index, {"type": "thinking_delta", "thinking": p}) for p in pieces),
        block_delta(index, {"type": "signature_delta", "signature": signature}),
        block_stop(index),
    ]


def text_stream(pieces: list[str], *, output_tokens: int = 15) -> list[Event]:
    """A plain text answer with a ping after message_start, as the documentation's example."""
    return [
        message_start(),
        PING,
        *text_events(0, pieces),
        message_delta("end_turn", output_tokens),
        MESSAGE_STOP,
    ]


def thinking_tools_stream() -> list[Event]:
    """Thinking with its signature, a text block and two tool_use blocks (indexes 2 and 3)."""
    return [
        message_start(472, cache_read=100, cache_write=50),
        *thinking_events(0, ["Let me think", " about the weather."], "EqQBCgIYAhIM1gbcDa9GJwZA"),
        *text_events(1, ["Checking both."]),
        PING,
        *tool_events(2, "get_weather", "toolu_01A", ['{"location":', ' "Paris"}']),
        *tool_events(3, "get_time", "toolu_01B", ['{"tz": "CET"}']),
        message_delta("tool_use", 89),
        MESSAGE_STOP,
    ]


def encode_sse(events: list[Event]) -> bytes:
    """The exact bytes of the stream: `event: <name>`, `data: <json>`, a blank line."""
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        for name, data in events
    )


RATE_LIMIT_HEADERS = {
    "retry-after": "7",
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:07Z",
    "anthropic-ratelimit-tokens-limit": "40000",
    "anthropic-ratelimit-tokens-remaining": "0",
    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:07Z",
}


@dataclass
class Reply:
    """One scripted answer: a JSON body (`json_body`) or an SSE stream (`sse`)."""

    status: int = 200
    json_body: Any = None
    sse: list[Event] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(status: int, error_type: str, text: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, json_body=error_body(error_type, text), headers=headers or {})


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


class AnthropicFake:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply(json_body=message())
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def root_url(self) -> str:
        """What the SDK takes as `base_url` (it appends /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What the gateway takes (DEFAULT_BASE_URL's shape)."""
        return f"{self.root_url}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        # Header names lowercased: HTTP names are case-insensitive, a dict is not.
        self.requests.append(Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        reply = self.replies.popleft() if self.replies else self.default
        if reply is self.default and isinstance(body, dict) and not body.get("stream"):
            reply = _forced_reply(body) or reply  # as Anthropic: tool_choice any/tool is honoured
        headers = {"request-id": REQUEST_ID, **reply.headers}
        if reply.sse is None:
            return web.json_response(reply.json_body, status=reply.status, headers=headers)
        response = web.StreamResponse(
            status=reply.status,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **headers,
            },
        )
        await response.prepare(request)
        for event in reply.sse:  # one write per event, as the API flushes them
            await response.write(encode_sse([event]))
        await response.write_eof()
        return response


def _forced_reply(body: dict[str, Any]) -> Reply | None:
    """The default answer to `tool_choice` "any" (a call of the first tool) or "tool" (of it)."""
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list) or not tools:
        return None
    if choice.get("type") == "tool":
        name = str(choice.get("name") or "")
    elif choice.get("type") == "any":
        name = str(tools[0].get("name") or "")
    else:
        return None
    return Reply(json_body=message([tool_use_block(name, {})], stop_reason="tool_use"))
