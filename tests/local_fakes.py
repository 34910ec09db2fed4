"""Fake local LLM servers: one real aiohttp server on loopback per endpoint type.

Each fake answers the way that server does and checks the request it receives:

- ollama     POST /api/generate: one JSON object, or NDJSON lines when `stream` is true
             (`{"response": tok, "done": false}` ... `{"done": true, prompt_eval_count, eval_count}`).
- llamacpp   POST /completion: JSON with `content`, `tokens_evaluated`, `tokens_predicted`,
             `timings`; streamed as SSE `data: {"content": tok, "stop": false}` ... `"stop": true`
             with the counters, no `[DONE]`.
- vllm, lmstudio, webui
             POST /v1/completions: OpenAI text completion JSON (`choices[0].text`, `usage`); streamed
             as OpenAI SSE chunks, a final usage chunk when `stream_options.include_usage`, then
             `data: [DONE]`.
- koboldcpp  POST /api/v1/generate: `{"results": [{"text": ...}]}`, no usage; streamed from
             POST /api/extra/generate/stream as `event: message` / `data: {"token": tok,
             "finish_reason": null}` ... a last event with a finish reason.

A request of the wrong shape (path, missing or mistyped field, a field that server type does not
take) is answered as the real server would refuse it (404 / 400 / 422), and the problem is added to
`violations`; the `local_server` fixture fails the test when any were recorded.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

KINDS = ("ollama", "llamacpp", "vllm", "lmstudio", "koboldcpp", "webui")
OPENAI_KINDS = ("vllm", "lmstudio", "webui")
GRAMMAR_KINDS = ("llamacpp", "koboldcpp", "webui")

SEND_MESSAGE_OUTPUT = (
    '{"function": "send_message", "params": {"thinking": "The user greets me.", "message": "Hi there!"}}'
)

# Request fields each server type is sent (required) or may be sent (optional), with their types.
_INT = int
_SHAPES: dict[
    str, dict[str, tuple[dict[str, type | tuple[type, ...]], dict[str, type | tuple[type, ...]]]]
] = {
    "ollama": {
        "/api/generate": (
            {"model": str, "prompt": str, "stream": bool, "raw": bool, "options": dict},
            {},
        ),
    },
    "llamacpp": {
        "/completion": (
            {"prompt": str, "n_predict": _INT, "stop": list, "stream": bool},
            {"grammar": str, "temperature": (int, float)},
        ),
    },
    "vllm": {
        "/v1/completions": (
            {"model": str, "prompt": str, "max_tokens": _INT, "stream": bool, "user": str, "stop": list},
            {"temperature": (int, float), "stream_options": dict},
        ),
    },
    "lmstudio": {
        "/v1/completions": (
            {"model": str, "prompt": str, "max_tokens": _INT, "stream": bool, "stop": list},
            {"temperature": (int, float)},
        ),
    },
    "koboldcpp": {
        # max_context_length is sent for a known context window (koboldcpp defaults it otherwise).
        "/api/v1/generate": (
            {"prompt": str, "max_length": _INT, "stop_sequence": list},
            {"max_context_length": _INT, "grammar": str, "temperature": (int, float)},
        ),
        "/api/extra/generate/stream": (
            {"prompt": str, "max_length": _INT, "stop_sequence": list},
            {"max_context_length": _INT, "grammar": str, "temperature": (int, float)},
        ),
    },
    "webui": {
        "/v1/completions": (
            {"prompt": str, "truncation_length": _INT, "max_tokens": _INT, "stream": bool, "stop": list},
            {"grammar_string": str, "temperature": (int, float)},
        ),
    },
}


@dataclass
class Answer:
    """One scripted answer: the model's text, streamed in `chunks` when asked to stream."""

    text: str = SEND_MESSAGE_OUTPUT
    chunks: list[str] | None = None  # default: the text in pieces of 7 characters
    prompt_tokens: int = 42
    completion_tokens: int = 17
    break_after: int | None = None  # streams: drop the connection after this many events
    end_after: int | None = None  # streams: end the body cleanly after this many events (no final one)
    status: int = 200
    error_body: Any = None  # with a status >= 400: what the server says
    # Streams: after the first event, wait for this before sending the rest (a test sets it once
    # the first delta reached the gRPC client, proving deltas are relayed as they come).
    gate: asyncio.Event | None = None
    # The generation hit the token limit: each server's own way of saying so (ollama
    # done_reason "length", llama.cpp stop_type "limit" + stopped_limit, the others "length").
    cut: bool = False

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return self.chunks
        return [self.text[i : i + 7] for i in range(0, len(self.text), 7)] or [""]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        return str(self.body.get("prompt", ""))

    @property
    def grammar(self) -> str | None:
        value = self.body.get("grammar", self.body.get("grammar_string"))
        return value if isinstance(value, str) else None


@dataclass
class LocalServer:
    """A fake server of one endpoint type; `script()` answers, `requests` records what came in."""

    kind: str
    requests: list[Received] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    answers: deque[Answer] = field(default_factory=deque)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The URL users configure: vLLM, LM Studio and the web UI usually with `/v1`."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind in OPENAI_KINDS else root

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    @property
    def last(self) -> Received:
        assert self.requests, f"{self.kind} received no request"
        return self.requests[-1]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- request checking ----------------------------------------------------------------------

    def _refuse(self, status: int, problem: str) -> web.Response:
        self.violations.append(problem)
        if self.kind == "ollama":
            return web.json_response({"error": problem}, status=status)
        if self.kind == "llamacpp":
            return web.json_response(
                {"error": {"code": status, "message": problem, "type": "invalid_request_error"}},
                status=status,
            )
        if self.kind == "koboldcpp":
            return web.json_response({"detail": {"msg": problem, "type": "bad_input"}}, status=status)
        return web.json_response(
            {"object": "error", "message": problem, "type": "BadRequestError", "code": status}, status=status
        )

    def _check(self, request: web.Request, body: Any) -> web.Response | None:
        shapes = _SHAPES[self.kind]
        if request.method != "POST" or request.path not in shapes:
            return self._refuse(404, f"{self.kind}: no route {request.method} {request.path}")
        if request.headers.get("Content-Type", "").split(";")[0] != "application/json":
            return self._refuse(400, f"{self.kind}: Content-Type is {request.headers.get('Content-Type')!r}")
        if not isinstance(body, dict):
            return self._refuse(400, f"{self.kind}: the body is not a JSON object")
        required, optional = shapes[request.path]
        for name, kind in required.items():
            if name not in body:
                return self._refuse(422, f"{self.kind}: missing field {name!r}")
            if not _is(body[name], kind):
                return self._refuse(422, f"{self.kind}: field {name!r} is {type(body[name]).__name__}")
        for name, value in body.items():
            if name in required:
                continue
            if name not in optional:
                return self._refuse(422, f"{self.kind}: unexpected field {name!r}")
            if not _is(value, optional[name]):
                return self._refuse(422, f"{self.kind}: field {name!r} is {type(value).__name__}")
        problem = self._check_values(request.path, body)
        return self._refuse(400, f"{self.kind}: {problem}") if problem else None

    def _check_values(self, path: str, body: dict[str, Any]) -> str | None:
        if not body["prompt"]:
            return "empty prompt"
        if self.kind == "ollama":
            if body["raw"] is not True:
                return "raw must be true (the prompt is already templated)"
            options = body["options"]
            for name in ("num_ctx", "num_predict"):
                if not _is(options.get(name), int) or options[name] <= 0:
                    return f"options.{name} must be a positive integer, got {options.get(name)!r}"
            unknown = set(options) - {"num_ctx", "num_predict", "stop", "temperature"}
            if unknown:
                return f"unexpected options {sorted(unknown)}"
        if self.kind == "vllm":
            if body["stream"] and body.get("stream_options") != {"include_usage": True}:
                return "a stream should ask for usage"
            if not body["stream"] and "stream_options" in body:
                return "stream_options without stream"
        for name in ("max_tokens", "n_predict", "max_length", "max_context_length", "truncation_length"):
            if name in body and body[name] <= 0:
                return f"{name} must be positive"
        grammar = body.get("grammar", body.get("grammar_string"))
        if grammar is not None and "root ::=" not in grammar:
            return "the grammar has no root rule"
        if self.kind == "koboldcpp" and path == "/api/extra/generate/stream" and "stream" in body:
            return "koboldcpp streams by path, not by a stream field"
        return None

    # -- answering -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            Received(request.path, dict(request.headers), body if isinstance(body, dict) else {})
        )
        refused = self._check(request, body)
        if refused is not None:
            return refused
        assert isinstance(body, dict)  # _check refused anything else
        answer = self.answers.popleft() if self.answers else Answer()
        if answer.status >= 400:
            return web.json_response(answer.error_body or {"error": "scripted failure"}, status=answer.status)
        streaming = bool(body.get("stream")) or request.path == "/api/extra/generate/stream"
        if not streaming:
            return web.json_response(self._whole(body, answer))
        return await self._stream(request, body, answer)

    def _whole(self, body: dict[str, Any], answer: Answer) -> dict[str, Any]:
        text, p, c = answer.text, answer.prompt_tokens, answer.completion_tokens
        reason = "length" if answer.cut else "stop"
        if self.kind == "ollama":
            return {
                "model": body["model"],
                "created_at": "2025-01-01T00:00:00.000000Z",
                "response": text,
                "done": True,
                "done_reason": reason,
                "context": [1, 2, 3],
                "total_duration": 5_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": p,
                "prompt_eval_duration": 2_000_000,
                "eval_count": c,
                "eval_duration": 2_000_000,
            }
        if self.kind == "llamacpp":
            return {
                "index": 0,
                "content": text,
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": "model.gguf",
                "tokens_predicted": c,
                "tokens_evaluated": p,
                "generation_settings": {"n_predict": body["n_predict"]},
                "prompt": body["prompt"],
                "has_new_line": False,
                "truncated": False,
                "stop_type": "limit" if answer.cut else "eos",
                "stopped_limit": answer.cut,
                "stopping_word": "",
                "tokens_cached": p + c,
                "timings": {"prompt_n": p, "prompt_ms": 1.0, "predicted_n": c, "predicted_ms": 2.0},
            }
        if self.kind == "koboldcpp":
            return {"results": [{"text": text, "finish_reason": reason, "logprobs": None}]}
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 1732000000,
            "model": body.get("model", "local-model"),
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
            ],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }

    async def _stream(self, request: web.Request, body: dict[str, Any], answer: Answer) -> web.StreamResponse:
        ndjson = self.kind == "ollama"
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson" if ndjson else "text/event-stream"}
        )
        await response.prepare(request)
        events = self._stream_events(body, answer)
        for n, (event_name, payload) in enumerate(events):
            if answer.break_after is not None and n >= answer.break_after:
                assert request.transport is not None
                request.transport.close()
                return response
            if answer.end_after is not None and n >= answer.end_after:
                break
            if ndjson:
                frame = json.dumps(payload) + "\n"
            else:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                frame = (f"event: {event_name}\n" if event_name else "") + f"data: {data}\n\n"
            await response.write(frame.encode())
            if n == 0 and answer.gate is not None:
                try:
                    await asyncio.wait_for(answer.gate.wait(), timeout=10)
                except TimeoutError:
                    self.violations.append(
                        f"{self.kind}: the first delta was not relayed while the stream was open"
                    )
            await asyncio.sleep(0)  # let each event go out on its own, as a real server's do
        await response.write_eof()
        return response

    def _stream_events(self, body: dict[str, Any], answer: Answer) -> list[tuple[str | None, Any]]:
        pieces, p, c = answer.pieces(), answer.prompt_tokens, answer.completion_tokens
        reason = "length" if answer.cut else "stop"
        if self.kind == "ollama":
            stamp = "2025-01-01T00:00:00.000000Z"
            events: list[tuple[str | None, Any]] = [
                (None, {"model": body["model"], "created_at": stamp, "response": t, "done": False})
                for t in pieces
            ]
            events.append(
                (
                    None,
                    {
                        "model": body["model"],
                        "created_at": stamp,
                        "response": "",
                        "done": True,
                        "done_reason": reason,
                        "context": [1, 2, 3],
                        "total_duration": 5_000_000,
                        "prompt_eval_count": p,
                        "eval_count": c,
                    },
                )
            )
            return events
        if self.kind == "llamacpp":
            events = [
                (
                    None,
                    {
                        "index": 0,
                        "content": t,
                        "tokens": [],
                        "stop": False,
                        "id_slot": -1,
                        "tokens_predicted": i + 1,
                        "tokens_evaluated": p,
                    },
                )
                for i, t in enumerate(pieces)
            ]
            events.append(
                (
                    None,
                    {
                        "index": 0,
                        "content": "",
                        "tokens": [],
                        "id_slot": 0,
                        "stop": True,
                        "model": "model.gguf",
                        "tokens_predicted": c,
                        "tokens_evaluated": p,
                        "stop_type": "limit" if answer.cut else "eos",
                        "stopped_limit": answer.cut,
                        "stopping_word": "",
                        "timings": {"prompt_n": p, "predicted_n": c},
                    },
                )
            )
            return events
        if self.kind == "koboldcpp":
            events = [("message", {"token": t, "finish_reason": None}) for t in pieces]
            events.append(("message", {"token": "", "finish_reason": reason}))
            return events

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": 1732000000,
                "model": body.get("model", "local-model"),
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
                ],
            }

        events = [(None, chunk(t, None)) for t in pieces]
        events.append((None, chunk("", reason)))
        if body.get("stream_options", {}).get("include_usage"):
            events.append(
                (
                    None,
                    {
                        "id": "cmpl-fake",
                        "object": "text_completion",
                        "created": 1732000000,
                        "model": body.get("model", ""),
                        "choices": [],
                        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                    },
                )
            )
        events.append((None, "[DONE]"))
        return events


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind)
