"""The floor: a bare grpc.aio server (uvloop, as the gateway) answering fixed bytes, no upstream.

Same service and methods as the gateway, so the same load generator drives it: `Create` returns
one pre-serialized CreateResponse, `StreamCreate` yields `--messages` pre-serialized events. Its
CPU per call is what grpc.aio itself costs; the gateway's number minus this is ours to cut.

With `--upstream URL --client aiohttp|gateway` it is the issue's "bare forwarder": `Create` first
POSTs the workload's OpenAI body to `URL/chat/completions` with that HTTP client and reads the
answer (no validation, no token guard, no traces), then returns the fixed answer. Its CPU per
call calibrates the machine: the issue measured the aiohttp one at about 340 us.

With `--relay URL [--client aiohttp|gateway]` it is the floor of a relayed stream: `StreamCreate`
POSTs the workload's streaming body to `URL/chat/completions` with that HTTP client and, for what each
socket read brought, parses the SSE events' JSON and sends their content as one delta message
(as the gateway merges what one read brought), then a fixed completion. No validation, token
guard, accumulator, scrubbing or traces: what relaying a paced stream through grpc.aio costs
at the least.

Run: `python -m bench.floor --port 0 --ready-file PATH [--upstream URL --client aiohttp | --relay URL]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

FORWARD_FAILED = "bench.floor: forwarding to the upstream failed"


def _messages(count: int) -> tuple[bytes, list[bytes]]:
    from llmgateway.v1 import chat_pb2

    completion = chat_pb2.ChatCompletion(id="chatcmpl-floor", model="gpt-4o-mini", created=1_760_000_000)
    choice = completion.choices.add(index=0, finish_reason=chat_pb2.FINISH_REASON_STOP)
    choice.message.role = chat_pb2.ROLE_ASSISTANT
    choice.message.content = "The quick brown fox jumps over the lazy dog. " * 4
    completion.usage.prompt_tokens = 212
    unary = chat_pb2.CreateResponse(completion=completion, provider_trace_id="provider_trace-floor")
    events = [
        chat_pb2.StreamCreateResponse(
            delta=chat_pb2.ChatCompletionDelta(index=0, content=f"tok{i} ")
        ).SerializeToString()
        for i in range(count - 1)
    ]
    events.append(
        chat_pb2.StreamCreateResponse(completion=completion, provider_trace_id="t").SerializeToString()
    )
    return unary.SerializeToString(), events


def _forward(upstream: str, client: str) -> Callable[[], Awaitable[None]]:
    """One POST of the workload body to the upstream, answer read whole, with `client`."""
    from bench.workload import openai_body

    url = upstream.rstrip("/") + "/chat/completions"
    body = openai_body(stream=False)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-forwarder"}
    if client == "aiohttp":
        import aiohttp

        session: aiohttp.ClientSession | None = None

        async def forward_aiohttp() -> None:
            nonlocal session
            if session is None:
                session = aiohttp.ClientSession()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

        return forward_aiohttp
    from server.providers.http import HttpClient, Timeout

    http = HttpClient()
    timeout = Timeout(total=30.0)

    async def forward_gateway_client() -> None:
        # private_ok: the bench's upstream is on loopback (operator-listed in the gateway's terms);
        # without it every call was refused before connecting, and the row measured an error path.
        response = await http.post(url, body, headers, timeout, private_ok=True)
        await response.read(1 << 26)

    return forward_gateway_client


def _relay(
    upstream: str, final: bytes, client: str, per_event: bool = False
) -> Callable[[], AsyncIterator[bytes]]:
    """The bare relay of one stream with `client`: a delta per upstream read (`per_event`: per
    SSE event, the naive relay), then `final`."""
    import orjson
    from llmgateway.v1 import chat_pb2

    from bench.workload import openai_body

    url = upstream.rstrip("/") + "/chat/completions"
    body = openai_body(stream=True)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-relay"}
    Event, Delta = chat_pb2.StreamCreateResponse, chat_pb2.ChatCompletionDelta

    def deltas(pending: bytes, data: bytes) -> tuple[list[bytes], bytes]:
        """The delta messages for the complete events in `pending + data`, and what is left."""
        *events, pending = (pending + data).split(b"\n\n")
        pieces = []
        for event in events:
            if event.startswith(b"data: {"):
                for choice in orjson.loads(event[6:]).get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        pieces.append(content)
        if per_event:
            return [Event(delta=Delta(content=piece)).SerializeToString() for piece in pieces], pending
        return ([Event(delta=Delta(content="".join(pieces))).SerializeToString()] if pieces else []), pending

    if client == "aiohttp":
        import aiohttp

        session: aiohttp.ClientSession | None = None

        async def relay_aiohttp() -> AsyncIterator[bytes]:
            nonlocal session
            if session is None:
                session = aiohttp.ClientSession()
            async with session.post(url, data=body, headers=headers) as response:
                pending = b""
                async for data in response.content.iter_any():
                    messages, pending = deltas(pending, data)
                    for message in messages:
                        yield message
            yield final

        return relay_aiohttp

    from server.providers.http import HttpClient, Timeout

    http = HttpClient()
    timeout = Timeout(total=600.0)

    async def relay_gateway_client() -> AsyncIterator[bytes]:
        response = await http.post(url, body, headers, timeout, private_ok=True)
        try:
            pending = b""
            while data := await response.read_chunk():
                messages, pending = deltas(pending, data)
                for message in messages:
                    yield message
        except BaseException:
            response.close()
            raise
        response.release()
        yield final

    return relay_gateway_client


async def serve(
    port: int,
    ready_file: str | None,
    count: int,
    upstream: str | None = None,
    client: str = "aiohttp",
    relay_to: str | None = None,
    per_event: bool = False,
) -> None:
    import grpc

    unary, events = _messages(count)
    forward = _forward(upstream, client) if upstream else None
    relay = _relay(relay_to, events[-1], client, per_event) if relay_to else None

    failed = False

    async def create(_request: bytes, _context: object) -> bytes:
        nonlocal failed
        if forward is not None:
            try:
                await forward()
            except Exception as exc:
                # A gRPC error is still HTTP 200 to h2load: the runner reads this line instead.
                if not failed:
                    failed = True
                    print(f"{FORWARD_FAILED}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                raise
        return unary

    async def stream_create(_request: bytes, _context: object) -> AsyncIterator[bytes]:
        if relay is not None:
            async for message in relay():
                yield message
            return
        for event in events:
            yield event

    handler = grpc.method_handlers_generic_handler(
        "llmgateway.v1.ChatCompletionService",
        {
            "Create": grpc.unary_unary_rpc_method_handler(create),
            "StreamCreate": grpc.unary_stream_rpc_method_handler(stream_create),
        },
    )
    from server.config import Settings
    from server.grpc_options import pending_call_options

    # The gateway's queue of not-yet-started calls (server/grpc_options.py): with grpc's own
    # limits a floor holding 2,000 streams drops some new calls (bare CANCELLED), and the held
    # rows would compare a relay that lost streams with one that kept them all.
    server = grpc.aio.server(options=pending_call_options(Settings()))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write(str(bound))
        os.replace(ready_file + ".tmp", ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    parser.add_argument("--messages", type=int, default=51, help="events per StreamCreate")
    parser.add_argument("--upstream", help="forward each Create to this OpenAI-compatible base URL first")
    parser.add_argument("--client", choices=("aiohttp", "gateway"), default="aiohttp")
    parser.add_argument("--relay", help="StreamCreate relays a stream from this OpenAI-compatible base URL")
    parser.add_argument(
        "--per-event", action="store_true", help="--relay: one message per SSE event (the naive relay)"
    )
    args = parser.parse_args(argv)
    if args.upstream or (args.relay and args.client == "aiohttp"):
        # The calibration point is the stock forwarder: stock gRPC runtime too.
        os.environ["GRPC_EXPERIMENTS"] = ""
    else:
        # The floor is what grpc.aio costs the gateway: the gateway's gRPC runtime.
        from server.grpc_runtime import apply_grpc_defaults

        apply_grpc_defaults()
    import uvloop

    uvloop.run(
        serve(
            args.port, args.ready_file, args.messages, args.upstream, args.client, args.relay, args.per_event
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
