"""The load generator: one process of a multi-process client (gRPC or HTTP/1.1), driven by bench.

Each process opens a few connections, warms up, prints `ready`, waits for `go` on stdin, runs
its share of the requests with `--concurrency` in flight (closed loop, or paced to `--rate`
requests/s in total for this process), writes the latencies (float64 microseconds, native order)
to `--latencies`, and prints one JSON line with counts, wall time and its own CPU time.

gRPC requests are pre-serialized and sent through `unary_unary`/`unary_stream` with no
serializers, so the client pays no protobuf cost per call. The HTTP client is a minimal
keep-alive HTTP/1.1 protocol on asyncio (content-length and chunked bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections.abc import Awaitable, Callable

GRPC_SERVICE = "/llmgateway.v1.ChatCompletionService/"


# -- HTTP/1.1 ---------------------------------------------------------------------------------


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection; `request()` sends one request and waits for the whole body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            done = self._complete()
            if done is not None:
                self.waiter.set_result(done)

    def _complete(self) -> int | None:
        """The status once a whole response is buffered (and consumed), else None."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return None
            del buf[:total]
            return status
        if b"transfer-encoding: chunked" in head:
            pos = end + 4
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
                pos = line_end + 2 + size + 2
                if len(buf) < pos:
                    return None
                if size == 0:
                    del buf[:pos]
                    return status
        # No length: the body ends with the connection (not expected from the targets here).
        if self.closed:
            self.buf.clear()
            return status
        return None

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def _http_request(url: str, body: bytes, bearer: str, headers: list[str]) -> tuple[str, int, bytes]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    # Extra headers replace the default authorization when they carry one.
    auth = (
        ""
        if any(h.lower().startswith("authorization:") for h in headers)
        else f"authorization: Bearer {bearer}\r\n"
    )
    extra = "".join(f"{h}\r\n" for h in headers)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"{auth}{extra}accept: */*\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return host, port, head + body


async def _http_callers(
    url: str, body: bytes, connections: int, bearer: str, headers: list[str]
) -> list[Callable[[], Awaitable[bool]]]:
    host, port, data = _http_request(url, body, bearer, headers)
    loop = asyncio.get_running_loop()
    callers = []
    for _ in range(connections):
        _, conn = await loop.create_connection(_HttpConnection, host, port)

        async def call(conn: _HttpConnection = conn) -> bool:
            status = await conn.request(data)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            return True

        callers.append(call)
    return callers


# -- gRPC -------------------------------------------------------------------------------------


async def _grpc_callers(
    target: str, method: str, body: bytes, connections: int, expect_messages: int
) -> tuple[list[Callable[[], Awaitable[bool]]], list[object]]:
    import grpc

    callers = []
    channels: list[object] = []
    for i in range(connections):
        # A private subchannel pool and a distinct argument give every channel its own connection,
        # so SO_REUSEPORT can spread them over the workers.
        channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.use_local_subchannel_pool", 1),
                ("bench.channel", i),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        channels.append(channel)
        if method == "StreamCreate":
            stub = channel.unary_stream(GRPC_SERVICE + method)

            async def call(stub: object = stub) -> bool:
                n = 0
                async for _ in stub(body):  # type: ignore[operator]
                    n += 1
                return n == expect_messages or expect_messages == 0

        else:
            stub = channel.unary_unary(GRPC_SERVICE + method)

            async def call(stub: object = stub) -> bool:
                return bool(await stub(body))  # type: ignore[operator]

        callers.append(call)
    return callers, channels


# -- driver -----------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> dict[str, object]:
    with open(args.body, "rb") as f:
        body = f.read()
    channels: list[object] = []
    if args.protocol == "grpc":
        callers, channels = await _grpc_callers(
            args.target, args.method, body, args.connections, args.expect_messages
        )
    else:
        callers = await _http_callers(args.target, body, args.connections, args.bearer, args.header)

    errors = 0
    first_error = ""

    async def one(i: int) -> float:
        nonlocal errors, first_error
        start = time.perf_counter()
        try:
            ok = await callers[i % len(callers)]()
        except Exception as exc:  # noqa: BLE001 - counted, reported once
            ok = False
            if not first_error:
                first_error = f"{type(exc).__name__}: {exc}"[:300]
        if not ok:
            errors += 1
        return (time.perf_counter() - start) * 1e6

    # Warm-up: every connection, then a few rounds at full concurrency.
    await asyncio.gather(*(one(i) for i in range(len(callers))))
    for _ in range(args.warmup):
        await asyncio.gather(*(one(i) for i in range(args.concurrency)))
    warm_errors, errors, first_error = errors, 0, ""

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return {"aborted": True}

    latencies = array("d")
    remaining = args.requests
    interval = args.concurrency / args.rate if args.rate > 0 else 0.0
    cpu0 = time.process_time()
    t0 = time.perf_counter()

    async def user(index: int) -> None:
        nonlocal remaining
        next_at = t0 + (index * interval / args.concurrency if interval else 0.0)
        while remaining > 0:
            remaining -= 1
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            latencies.append(await one(index))

    await asyncio.gather(*(user(i) for i in range(args.concurrency)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    with open(args.latencies, "wb") as f:
        latencies.tofile(f)
    for channel in channels:
        await channel.close()  # type: ignore[attr-defined]
    return {
        "requests": len(latencies),
        "errors": errors,
        "warmup_errors": warm_errors,
        "first_error": first_error,
        "wall": wall,
        "cpu": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--protocol", choices=("grpc", "http"), required=True)
    parser.add_argument("--target", required=True, help="host:port for gRPC, a URL for HTTP")
    parser.add_argument("--method", default="Create", help="gRPC method: Create or StreamCreate")
    parser.add_argument("--body", required=True, help="file with the request bytes")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests/s for this process (0: closed loop)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="rounds of `concurrency` requests before `ready`"
    )
    parser.add_argument("--expect-messages", type=int, default=0, help="stream messages per call (0: any)")
    parser.add_argument("--latencies", required=True)
    parser.add_argument("--bearer", default="sk-bench", help="HTTP: the Authorization bearer token")
    parser.add_argument("--header", action="append", default=[], help="HTTP: an extra 'name: value' header")
    args = parser.parse_args(argv)
    args.connections = max(1, min(args.connections, args.concurrency))
    if args.protocol == "http":
        args.connections = args.concurrency  # HTTP/1.1: one request in flight per connection
    result = asyncio.run(_run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
