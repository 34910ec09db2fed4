"""SIGHUP reloads the routes file in the real server process (`python -m server serve`), under
load, losing no call; an unusable file keeps the routes in use; with --workers 2 the parent
passes SIGHUP on and each worker reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.process_harness import async_server_process
from tests.trace_polling import eventually

KEY_A = "sk-reload-a-" + "a" * 40
KEY_B = "sk-reload-b-" + "b" * 40


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream(), FakeUpstream()]
    for server in servers:
        await server.start()
        server.default = Reply(json_body=completion(), delay=0.05)  # calls overlap the reload
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def routes(name: str, base_url: str, variable: str) -> str:
    return (
        "[routes.chat]\n[[routes.chat.deployments]]\n"
        f'name = "{name}"\nprovider = "openai"\nmodel = "m-{name}"\n'
        f'base_url = "{base_url}"\nkey = "{variable}"\n'
    )


def replace_file(path: Path, text: str) -> None:
    # Written whole, then renamed: a reload never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _reload_under_load(tmp_path: Path, fakes: list[FakeUpstream], workers: int) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(routes("a", fakes[0].base_url, "ROUTE_KEY_A"))
    env = {"LLMGW_ROUTES_FILE": str(path), "ROUTE_KEY_A": KEY_A, "ROUTE_KEY_B": KEY_B}
    listen = f"127.0.0.1:{free_port()}" if workers > 1 else "127.0.0.1:0"
    extra = ["--workers", str(workers)] if workers > 1 else []
    async with async_server_process(tmp_path, env=env, listen=listen, extra_args=extra) as server:
        channel = grpc.aio.insecure_channel(server.address)
        stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        answered: list[str] = []
        stop = asyncio.Event()
        request = chat_pb2.CreateRequest(
            route="chat", messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")]
        )

        async def client() -> None:
            while not stop.is_set():
                response = await stub.Create(request, timeout=10)  # any failure fails the test
                answered.append(response.deployment.name)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            await eventually(lambda: len(answered) >= 20, timeout=20)
            # Every worker serving: one still importing ignores SIGHUP (it reads the new file at
            # start-up, and says nothing about a reload).
            await eventually(lambda: server.log.count("llm-gateway serving on") >= workers, timeout=20)
            replace_file(path, routes("b", fakes[1].base_url, "ROUTE_KEY_B"))
            server.send_signal(signal.SIGHUP)
            await eventually(lambda: server.log.count("routes reloaded") >= workers, timeout=20)
            seen = len(answered)
            await eventually(lambda: len(answered) >= seen + 40, timeout=20)
            # Every call started after the reload goes to B.
            assert set(answered[seen + 8 :]) == {"b"}, answered[seen:]
            # An unusable file: logged with its line, and the routes in use stay.
            replace_file(
                path, routes("c", fakes[0].base_url, "ROUTE_KEY_A").replace("key =", "weight = 0\nkey =")
            )
            server.send_signal(signal.SIGHUP)
            await eventually(lambda: server.log.count("routes not reloaded") >= workers, timeout=20)
            seen = len(answered)
            await eventually(lambda: len(answered) >= seen + 20, timeout=20)
            assert set(answered[seen:]) == {"b"}
        finally:
            stop.set()
            results = await asyncio.gather(*clients, return_exceptions=True)
            await channel.close()
        assert all(r is None for r in results), [r for r in results if r is not None]
        assert server.process.poll() is None  # SIGHUP never stops the server
    assert "a" in answered and "b" in answered
    assert "line 7" in server.log and "weight must be a positive number" in server.log
    assert KEY_A not in server.log and KEY_B not in server.log
    assert all(r.headers["Authorization"] == f"Bearer {KEY_B}" for r in fakes[1].requests)


@pytest.mark.slow
async def test_sighup_reload_under_load_loses_no_call(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    await _reload_under_load(tmp_path, fakes, workers=1)


@pytest.mark.slow
async def test_sighup_reaches_every_worker(tmp_path: Path, fakes: list[FakeUpstream]) -> None:
    await _reload_under_load(tmp_path, fakes, workers=2)
