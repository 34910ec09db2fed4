"""The serving process tunes the cyclic collector once start-up is done (server/gc_tuning.py).

Issue 20's held-streams run found the event loop paused 17-38 ms by full collections walking
the ~60,000 objects start-up made. Freezing them is for good, so it is done by `serve()` (the
process), never by `GatewayServer.start()` (tests start many servers in one process).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.process_harness import start_server_process

TUNED = "garbage collector tuned for serving"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def test_tune_for_serving_freezes_start_up_and_raises_the_young_threshold() -> None:
    # In a fresh interpreter: freezing the test process's objects would be for good.
    code = (
        "import gc, server.app\n"
        "from server.gc_tuning import tune_for_serving, YOUNG_THRESHOLD\n"
        "before = gc.get_freeze_count()\n"
        "tune_for_serving()\n"
        "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == YOUNG_THRESHOLD)\n"
    )
    out = _python(code)
    before, frozen, threshold_set = out.stdout.split()
    assert int(before) == 0
    assert int(frozen) > 10_000  # the modules and descriptors start-up loaded
    assert threshold_set == "True"


def test_the_serving_process_tunes_the_collector(tmp_path: Path) -> None:
    server = start_server_process(tmp_path)
    try:
        # Tuned right after start-up, which ends with health SERVING: the line follows shortly.
        deadline = time.monotonic() + 10
        while TUNED not in server.log and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert server.stop() == 0
    assert TUNED in server.log, server.log[-2000:]


def test_a_server_started_in_process_leaves_the_collector_alone(tmp_path: Path) -> None:
    code = (
        "import asyncio, gc\n"
        "from server.app import GatewayServer\n"
        "from server.config import Settings\n"
        "async def main():\n"
        f"    db = {str(tmp_path / 't.db')!r}\n"
        "    settings = Settings(listen='127.0.0.1:0', sqlite_path=db, admin_listen='')\n"
        "    s = GatewayServer(settings)\n"
        "    await s.start()\n"
        "    await s.stop(grace=0.5)\n"
        "asyncio.run(main())\n"
        "print(gc.get_freeze_count(), gc.get_threshold()[0])\n"
    )
    out = _python(code)
    frozen, young = out.stdout.split()
    assert (int(frozen), int(young)) == (0, 700)  # CPython's defaults
