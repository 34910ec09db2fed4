"""`--workers 2`: one admin listener (worker 0) whose /metrics sums both real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import time
from pathlib import Path

import aiohttp
import grpc
from llmgateway.v1 import chat_pb2_grpc
from prometheus_client.mmap_dict import MmapedDict

from tests.fake_upstream import FakeUpstream, Reply, text_stream
from tests.gateway_harness import chat_request
from tests.integration.test_admin_metrics import Samples, delta, scrape, value
from tests.process_harness import async_server_process
from tests.trace_services import free_port

CALLS = 24


async def _first_scrape(port: int) -> Samples:
    """The server is ready when one worker answers gRPC: worker 0's admin listener may still be
    starting when worker 1 answered first."""
    deadline = time.monotonic() + 15.0
    while True:
        try:
            return await scrape(port)
        except aiohttp.ClientConnectorError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_one_scrape_sees_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    admin_port = free_port()
    async with async_server_process(
        tmp_path,
        listen=f"127.0.0.1:{free_port()}",
        allowed_endpoints=(upstream.base_url,),
        extra_args=["--workers", "2"],
        env={"LLMGW_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
    ) as server:
        before = await _first_scrape(admin_port)
        # A fresh connection per call: SO_REUSEPORT spreads them over both workers (all 24 on
        # one worker has a chance of 2**-23).
        for _ in range(CALLS):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                await stub.Create(chat_request(upstream.base_url, model="workers-model"), timeout=10)
        # Each worker flushes its counts to the shared files once a second: wait for both flushes
        # (worker 0's own counts are flushed by the scrape itself).
        labels = {"rpc": "Create", "provider": "openai", "model": "workers-model", "code": "OK"}
        deadline = time.monotonic() + 15.0
        after = await scrape(admin_port)
        while delta(before, after, "llmgw_requests_total", **labels) < CALLS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = await scrape(admin_port)
        assert server.log.count("admin listener (metrics and console) on") == 1  # worker 0 only
    assert delta(before, after, "llmgw_requests_total", **labels) == CALLS
    genai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "workers-model",
    }
    assert (
        delta(before, after, "gen_ai_client_operation_duration_seconds_count", error_type="", **genai)
        == CALLS
    )
    assert len(upstream.requests) == CALLS
    assert value(after, "llmgw_in_flight", kind="unary") == 0


def _workers(pid: int) -> list[int]:
    """The worker processes of the server `pid` (not multiprocessing's resource tracker)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in (int(x) for x in f.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as cmd:
                    if b"resource_tracker" not in cmd.read():
                        out.append(child)
    return out


def _listener_pid(pids: list[int], port: int) -> int:
    """The process holding the LISTEN socket of `port` (worker 0, the admin listener's)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
    raise AssertionError(f"no process listens on {port}")


MAX_STREAMS = 40


def _in_flight_by_pid(directory: str) -> dict[int, float]:
    """Each worker's own llmgw_in_flight{kind="stream"}, read from its gauge file."""
    out: dict[int, float] = {}
    for path in glob.glob(os.path.join(directory, "gauge_livesum_*.db")):
        pid = int(path.rsplit("_", 1)[1].split(".")[0])
        for key, amount, *_ in MmapedDict.read_all_values_from_file(path):
            if '"llmgw_in_flight"' in key and '"stream"' in key:
                out[pid] = out.get(pid, 0.0) + amount
    return out


async def test_a_crashed_workers_in_flight_calls_leave_the_gauge(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Worker 1 is killed (SIGKILL) with streams in flight: worker 0's scrape stops counting
    them once the parent saw it exit (before: they stayed in llmgw_in_flight forever)."""
    admin_port = free_port()
    async with async_server_process(
        tmp_path,
        listen=f"127.0.0.1:{free_port()}",
        allowed_endpoints=(upstream.base_url,),
        extra_args=["--workers", "2"],
        env={"LLMGW_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
    ) as server:
        await _first_scrape(admin_port)
        workers = _workers(server.process.pid)
        assert len(workers) == 2
        first = _listener_pid(workers, admin_port)
        (victim,) = [pid for pid in workers if pid != first]
        with open(f"/proc/{first}/environ", "rb") as f:  # the parent's variable, inherited
            directory = next(
                v.split(b"=", 1)[1].decode()
                for v in f.read().split(b"\0")
                if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
            )
        channels: list[grpc.aio.Channel] = []
        calls = []
        try:
            # Hanging streams on fresh connections until both workers hold some (SO_REUSEPORT
            # spreads connections at random; each worker flushes its gauge once a second).
            by_pid: dict[int, float] = {}
            while not (by_pid.get(first, 0) > 0 and by_pid.get(victim, 0) > 0):
                assert len(calls) < MAX_STREAMS, f"streams never reached both workers: {by_pid}"
                upstream.script(Reply(sse=text_stream(["a", "b", "c"]), hang_after=2))
                channel = grpc.aio.insecure_channel(
                    server.address, options=[("grpc.use_local_subchannel_pool", 1)]
                )
                channels.append(channel)
                call = chat_pb2_grpc.ChatCompletionServiceStub(channel).StreamCreate(
                    chat_request(upstream.base_url, model="crash-model"), timeout=60
                )
                await call.read()
                calls.append(call)
                await asyncio.sleep(1.2)  # a flush
                await scrape(admin_port)  # worker 0 flushes on a scrape
                by_pid = _in_flight_by_pid(directory)
            assert sum(by_pid.values()) == len(calls)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 15.0
            samples = await scrape(admin_port)
            while value(samples, "llmgw_in_flight", kind="stream") != by_pid[first]:
                assert time.monotonic() < deadline, (
                    f"in flight {value(samples, 'llmgw_in_flight', kind='stream')} after the crash; "
                    f"worker 0 holds {by_pid[first]}"
                )
                await asyncio.sleep(0.2)
                samples = await scrape(admin_port)
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()
        # The supervisor restarted the killed worker (issue 15): both then stop cleanly.
        assert await asyncio.to_thread(server.stop) == 0
