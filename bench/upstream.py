"""A fast OpenAI-compatible upstream for the benchmark: a bare asyncio HTTP/1.1 server.

`POST .../chat/completions` answers a fixed completion, or (when the body asks for a stream) a
fixed 50-chunk SSE stream with a usage chunk and `[DONE]`. Responses are built once at start, so
the upstream costs a parse of the request head and one write per request; it runs in its own
process so its CPU is never counted as the gateway's.

Paced streams (a model that is typing): under `/paced/<chunks>/<gap_us>/...` a stream sends
`<chunks>` content chunks, one write each, `<gap_us>` microseconds apart (on a fixed schedule
from the request, so a late chunk does not delay the next ones), then the usage chunk and
`[DONE]`. Each chunk's content is `tok<i>@<ns> `, where `<ns>` is `time.monotonic_ns()` when it
was written: a client on this machine (CLOCK_MONOTONIC is system-wide) subtracts it from its
own clock to get the chunk's delay through whatever sits in between.

Anthropic: `POST .../messages` answers the same completion as a Messages API `message`, or with
`"stream":true` the same 50 pieces as `message_start`, `content_block_start`, 50
`content_block_delta`s, `content_block_stop`, `message_delta`, `message_stop`, in one write.

Run: `python -m bench.upstream --port 0 --ready-file PATH` (the bound port is written there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time

CHUNKS = 50
MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
PROMPT_TOKENS = 212
COMPLETION_TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _completion_body() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": COMPLETION_TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": 40,
                "total_tokens": PROMPT_TOKENS + 40,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        },
        separators=(",", ":"),
    ).encode()


def _stream_body(chunks: int = CHUNKS) -> list[bytes]:
    """The SSE events of one stream: `chunks` content deltas, a usage chunk, then [DONE]."""
    base = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
    }
    events = []
    for i in range(chunks):
        delta: dict[str, object] = {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        finish = "stop" if i == chunks - 1 else None
        events.append(
            {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )
    events.append(
        {
            **base,
            "choices": [],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": chunks,
                "total_tokens": PROMPT_TOKENS + chunks,
            },
        }
    )
    out = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        "connection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


COMPLETION_RESPONSE = _response("200 OK", "application/json", _completion_body())
STREAM_EVENTS = _stream_body()
STREAM_RESPONSE = _response("200 OK", "text/event-stream", b"".join(STREAM_EVENTS))


def _anthropic_message() -> bytes:
    return json.dumps(
        {
            "id": "msg_bench00000000000000000001",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": COMPLETION_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": PROMPT_TOKENS,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 40,
            },
        },
        separators=(",", ":"),
    ).encode()


def _anthropic_stream(chunks: int = CHUNKS) -> bytes:
    """The Messages API's SSE sequence for the same answer: one text block in `chunks` deltas."""

    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    start = {
        "id": "msg_bench00000000000000000002",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
    }
    events = [
        event("message_start", {"type": "message_start", "message": start}),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    for i in range(chunks):
        events.append(
            event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"tok{i} "},
                },
            )
        )
    events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        )
    )
    events.append(event("message_stop", {"type": "message_stop"}))
    return b"".join(events)


ANTHROPIC_RESPONSE = _response("200 OK", "application/json", _anthropic_message())
ANTHROPIC_STREAM_RESPONSE = _response("200 OK", "text/event-stream", _anthropic_stream())
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    b"connection: keep-alive\r\n\r\n"
)
# A paced chunk: the first one also carries the role; `%d`s are the index and the write time.
_PACED_BASE = (
    b'{"id":"chatcmpl-bench0000000000000000000003","object":"chat.completion.chunk",'
    b'"created":1760000000,"model":"' + MODEL.encode() + b'","system_fingerprint":"fp_bench",'
)
PACED_FIRST = _PACED_BASE + (
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"tok%d@%d "},'
    b'"logprobs":null,"finish_reason":null}]}'
)
PACED_CHUNK = _PACED_BASE + (
    b'"choices":[{"index":0,"delta":{"content":"tok%d@%d "},"logprobs":null,"finish_reason":null}]}'
)
PACED_LAST = _PACED_BASE + (
    b'"choices":[{"index":0,"delta":{"content":"tok%d@%d "},"logprobs":null,"finish_reason":"stop"}]}'
)
PACED_RE = re.compile(rb"/paced/(\d+)/(\d+)/")


def _sse_chunk(payload: bytes) -> bytes:
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _paced_tail(chunks: int) -> bytes:
    usage = _PACED_BASE + (
        b'"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}'
        % (PROMPT_TOKENS, chunks, PROMPT_TOKENS + chunks)
    )
    return _sse_chunk(usage) + _sse_chunk(b"[DONE]") + b"0\r\n\r\n"


class PacedStream:
    """One paced response: chunk i is written at start + (i + 1) * gap, by a loop timer.

    A timer callback per chunk (no task, no coroutine) keeps the upstream cheap enough to pace
    thousands of streams at once from one core.
    """

    __slots__ = ("transport", "chunks", "gap", "start", "index", "loop")

    def __init__(self, transport: asyncio.Transport, chunks: int, gap: float) -> None:
        self.transport = transport
        self.chunks = max(1, chunks)
        self.gap = gap
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.index = 0
        transport.write(CHUNKED_HEAD)
        self.loop.call_at(self.start + gap, self.tick)

    def tick(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        i = self.index
        last = i == self.chunks - 1
        template = PACED_FIRST if i == 0 else PACED_LAST if last else PACED_CHUNK
        data = _sse_chunk(template % (i, time.monotonic_ns()))
        if last:
            transport.write(data + _paced_tail(self.chunks))
            return
        transport.write(data)
        self.index = i + 1
        self.loop.call_at(self.start + (i + 2) * self.gap, self.tick)


MODELS_RESPONSE = _response(
    "200 OK",
    "application/json",
    json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode(),
)
NOT_FOUND = _response("404 Not Found", "application/json", b'{"error":{"message":"not found"}}')


class UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1: requests are parsed from one buffer, answered in order."""

    __slots__ = ("transport", "buffer", "gap")

    def __init__(self, gap: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.gap = gap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line = head.split(b"\r\n", 1)[0]
        stream = b'"stream":true' in body or b'"stream": true' in body
        if b"/chat/completions" in line:
            if not stream:
                self.transport.write(COMPLETION_RESPONSE)
            elif paced := PACED_RE.search(line):
                PacedStream(self.transport, int(paced.group(1)), int(paced.group(2)) / 1e6)
            elif self.gap > 0:
                PacedStream(self.transport, CHUNKS, self.gap)
            else:
                self.transport.write(STREAM_RESPONSE)
        elif b"/messages" in line:
            self.transport.write(ANTHROPIC_STREAM_RESPONSE if stream else ANTHROPIC_RESPONSE)
        elif b"/models" in line:
            self.transport.write(MODELS_RESPONSE)
        else:
            self.transport.write(NOT_FOUND)


async def serve(host: str, port: int, ready_file: str | None, gap: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(gap), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(bound))
        os.replace(tmp, ready_file)
    else:
        print(bound, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    parser.add_argument("--stream-gap-ms", type=float, default=0.0, help="pace stream events (0: one write)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(serve(args.host, args.port, args.ready_file, args.stream_gap_ms / 1000.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
