"""A fast OpenAI-compatible upstream for the benchmark: a bare asyncio HTTP/1.1 server.

`POST .../chat/completions` answers a fixed completion, or (when the body asks for a stream) a
fixed 50-chunk SSE stream with a usage chunk and `[DONE]`. Responses are built once at start, so
the upstream costs a parse of the request head and one write per request; it runs in its own
process so its CPU is never counted as the gateway's.

Run: `python -m bench.upstream --port 0 --ready-file PATH` (the bound port is written there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

CHUNKS = 50
MODEL = "gpt-4o-mini"
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
        if b"/chat/completions" in line:
            if b'"stream":true' in body or b'"stream": true' in body:
                if self.gap > 0:
                    asyncio.ensure_future(self.paced_stream())
                else:
                    self.transport.write(STREAM_RESPONSE)
            else:
                self.transport.write(COMPLETION_RESPONSE)
        elif b"/models" in line:
            self.transport.write(MODELS_RESPONSE)
        else:
            self.transport.write(NOT_FOUND)

    async def paced_stream(self) -> None:
        """Chunked transfer, one event per write, `gap` seconds apart (a model that is typing)."""
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: keep-alive\r\n\r\n"
        )
        for event in STREAM_EVENTS:
            await asyncio.sleep(self.gap)
            if self.transport.is_closing():
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.transport.write(b"0\r\n\r\n")


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
