"""Health during shutdown, from outside: a Health/Watch stream open at SIGTERM sees NOT_SERVING,
then ends with UNAVAILABLE and an ErrorInfo (SHUTTING_DOWN) once the in-flight calls are done;
it never holds the server for the whole grace period to end with grpc's bare status."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_hardening_shutdown import error_reason
from tests.process_harness import start_server_process


async def test_a_health_watch_open_at_sigterm_ends_with_shutting_down(tmp_path: Path) -> None:
    server = await asyncio.to_thread(start_server_process, tmp_path, extra_args=["--grace-period", "30"])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            seen = [(await watch.read()).status]
            assert seen == [health_pb2.HealthCheckResponse.SERVING]
            server.send_signal(signal.SIGTERM)
            ended: grpc.aio.AioRpcError | None = None
            try:
                # Bounded well below the 30 s grace period: no call is in flight, nothing to wait for.
                async with asyncio.timeout(15):
                    while (response := await watch.read()) is not grpc.aio.EOF:
                        seen.append(response.status)
            except grpc.aio.AioRpcError as exc:
                ended = exc
            code = await asyncio.to_thread(server.wait, 30)
    finally:
        server.close()
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, seen
    assert ended is not None, "the watch ended OK, as if the server were still there"
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, (ended.code(), ended.details())
    assert error_reason(ended) == "SHUTTING_DOWN", ended.details()
    assert code == 0, server.log[-3000:]
