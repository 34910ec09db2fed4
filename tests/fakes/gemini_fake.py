"""A fake Gemini API (`generativelanguage.googleapis.com/v1beta`): a real aiohttp server on loopback.

Every request is recorded (method, path, query, headers, JSON body) and answered by the next
scripted `Reply`, else by a default text answer. The payloads are the documented
`GenerateContentResponse` JSON (camelCase, `usageMetadata`, `modelVersion`, `responseId`); a
stream (`:streamGenerateContent?alt=sse`) is one `data: <json>` event per response, separated by
a blank line with CRLF line ends as Google's frontend sends them, and no event names and no
end marker; errors are Google's `{"error": {"code", "message", "status", "details"}}` bodies.
`tests/integration/test_gemini_fake_sdk.py` checks all of it with the official SDK.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL_VERSION = "gemini-2.5-flash"
RESPONSE_ID = "resp-fake-1"


def usage_metadata(
    prompt: int = 12, candidates: int = 5, *, thoughts: int = 0, cached: int = 0
) -> dict[str, Any]:
    """`usageMetadata` as Gemini reports it: totalTokenCount = prompt + candidates + thoughts."""
    meta: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    if cached:
        meta["cachedContentTokenCount"] = cached
    return meta


def response(
    parts: list[dict[str, Any]] | None = None,
    *,
    finish_reason: str | None = "STOP",
    usage: dict[str, Any] | None = None,
    response_id: str = RESPONSE_ID,
) -> dict[str, Any]:
    """One `GenerateContentResponse` with a single candidate."""
    candidate: dict[str, Any] = {
        "content": {"parts": parts if parts is not None else [{"text": "Hello!"}], "role": "model"},
        "index": 0,
    }
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    return {
        "candidates": [candidate],
        "usageMetadata": usage or usage_metadata(),
        "modelVersion": MODEL_VERSION,
        "responseId": response_id,
    }


def blocked_prompt(reason: str = "SAFETY") -> dict[str, Any]:
    """A prompt blocked before any candidate: no `candidates`, `promptFeedback.blockReason`."""
    return {
        "promptFeedback": {"blockReason": reason},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": MODEL_VERSION,
        "responseId": RESPONSE_ID,
    }


def function_call(name: str, args: dict[str, Any], *, signature: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if signature is not None:
        part["thoughtSignature"] = signature  # base64, as the API sends bytes
    return part


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(code: int, message: str, *, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS_NAMES[code]}
    if details is not None:
        error["details"] = details
    return {"error": error}


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


_QUOTA_METRIC = "generativelanguage.googleapis.com/generate_content_free_tier_requests"


def rate_limited(delay: str = "13s") -> dict[str, Any]:
    """Gemini's 429 as documented: QuotaFailure, Help and RetryInfo details."""
    return error_body(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": _QUOTA_METRIC,
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                        "quotaDimensions": {"location": "global", "model": MODEL_VERSION},
                        "quotaValue": "10",
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {"description": "Learn more", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}
                ],
            },
            retry_info(delay),
        ],
    )


def invalid_key() -> dict[str, Any]:
    """What Gemini answers for a bad key: 400 INVALID_ARGUMENT with reason API_KEY_INVALID."""
    return error_body(
        400,
        "API key not valid. Please pass a valid API key.",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    )


@dataclass(slots=True)
class Reply:
    """One scripted answer: a JSON body, or SSE events (`events`), with a status and headers."""

    body: dict[str, Any] | None = None
    events: list[dict[str, Any]] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any


class GeminiFake:
    """Start with `await fake.start()`; `fake.base_url` ends with `/v1beta`, like the real one."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self.root_url = ""

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1beta"

    def push(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def start(self) -> None:
        # Gemini takes requests up to 20 MB (its inline-data limit); aiohttp's default is 1 MiB.
        app = web.Application(client_max_size=20 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        assert isinstance(server, asyncio.Server) and server.sockets
        port = server.sockets[0].getsockname()[1]
        self.root_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = await request.json()
        except json.JSONDecodeError:
            payload = None
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), payload)
        )
        reply = self.script.popleft() if self.script else None
        streaming = request.path.endswith(":streamGenerateContent")
        if reply is None:
            # As Gemini: mode ANY is honoured with a call (unary; streams answer text as before).
            forced = None if streaming else _forced_response(payload)
            reply = Reply(events=[response()]) if streaming else Reply(body=forced or response())
        if reply.events is not None:
            return await self._stream(request, reply)
        return web.Response(
            status=reply.status,
            body=json.dumps(reply.body),
            content_type="application/json",
            charset="UTF-8",
            headers=reply.headers,
        )

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        out = web.StreamResponse(status=reply.status, headers=reply.headers)
        out.content_type = "text/event-stream"
        await out.prepare(request)
        for event in reply.events or ():
            await out.write(f"data: {json.dumps(event)}\r\n\r\n".encode())
        await out.write_eof()
        return out


def _forced_response(payload: Any) -> dict[str, Any] | None:
    """The default answer to functionCallingConfig mode ANY: a call of the first allowed name
    (or the first declared function)."""
    if not isinstance(payload, dict):
        return None
    config = (payload.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if config.get("mode") != "ANY":
        return None
    names = list(config.get("allowedFunctionNames") or ())
    for tool in payload.get("tools") or ():
        names.extend(d.get("name") for d in tool.get("functionDeclarations") or ())
    if not names:
        return None
    return response([{"functionCall": {"name": names[0], "args": {}}}])
