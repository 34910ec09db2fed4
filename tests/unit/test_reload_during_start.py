"""A SIGHUP that comes while the server starts is applied once it serves: start() may already
have read the routes file the signal announces a new version of."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from server import app
from server.config import Settings


class SlowStart:
    """A GatewayServer stand-in whose start() waits until the test lets it finish."""

    instances: list[SlowStart] = []

    def __init__(self, settings: Settings) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.reloads: list[bool] = []  # True: start() had finished when the reload ran
        self.serving = False
        SlowStart.instances.append(self)

    async def start(self) -> int:
        self.started.set()
        await self.finish.wait()
        self.serving = True
        return 1

    async def reload_routes(self) -> bool:
        self.reloads.append(self.serving)
        return True

    async def stop(self, grace: float | None = None) -> None:
        self.serving = False


async def test_sighup_during_start_up_reloads_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "GatewayServer", SlowStart)
    monkeypatch.setattr(app, "tune_for_serving", lambda: None)
    SlowStart.instances.clear()
    serving = asyncio.create_task(app.serve(Settings()))
    try:
        while not SlowStart.instances:
            await asyncio.sleep(0.01)
        server = SlowStart.instances[0]
        await asyncio.wait_for(server.started.wait(), 5)
        os.kill(os.getpid(), signal.SIGHUP)  # the loop's handler: start() is still running
        await asyncio.sleep(0.1)
        assert server.reloads == []  # not against a half-started server
        server.finish.set()
        for _ in range(100):
            if server.reloads:
                break
            await asyncio.sleep(0.01)
        assert server.reloads == [True]  # once, after start-up
        os.kill(os.getpid(), signal.SIGHUP)  # serving: reloads at once, as before
        for _ in range(100):
            if len(server.reloads) == 2:
                break
            await asyncio.sleep(0.01)
        assert server.reloads == [True, True]
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 5) == 0
