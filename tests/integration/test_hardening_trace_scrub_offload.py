"""Issue 12, item 6: a huge trace is scrubbed off the event loop, and still written, scrubbed.

The redactor's cost grows with the text, and much faster on text full of matches for its
patterns (`token=...&` below: ~3 s for 30 MB). The gateway, the fake upstream and these tests
share one event loop: the old code scrubbed the trace's answer on it, holding every other call
for seconds. Tiny calls must keep completing until the trace of the huge call is stored (the
scrub now runs after the answer went back), with no gap over a generous 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from server.auth.redact import REDACTED, Redactor
from server.config import Settings
from server.traces.base import TraceRecord
from server.traces.writer import TraceWriter
from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import RunningGateway, chat_request, make_settings, running_gateway
from tests.unit.test_trace_writer import MemoryBackend, make_record

MAX_GAP_S = 1.0
BIG_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
# Known to the gateway only as a server key (no pattern rule matches it): only the known net finds it.
SERVER_KEY = "srvkey-7d3f0a9c1e5b4d2f8a6c0e9b7d5f3a1c"


def huge_answer(repeats: int, filler: int = 0) -> str:
    """`repeats` pattern matches (~1.1 s of scrubbing per million), `filler` cheap characters."""
    return "token=abc&" * repeats + "lorem ipsum " * (filler // 12) + f" the key is {SERVER_KEY} done"


def settings_for(tmp_path: Path, upstream: FakeUpstream) -> Settings:
    return make_settings(
        tmp_path,
        allowed_endpoints=(upstream.base_url,),
        openai_api_key=SERVER_KEY,
        openai_base_url=upstream.base_url,
        trace_backends=("sqlite",),
    )


def request(upstream: FakeUpstream, step: str, prompt: str = "Say hello") -> chat_pb2.CreateRequest:
    return chat_request(
        upstream.base_url,
        (chat_pb2.ROLE_USER, prompt),
        trace=chat_pb2.TraceContext(step_id=step),
    )


def stored(path: str, step: str) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT request_json, response_json FROM provider_traces WHERE step_id = ?", (step,)
        ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


async def wait_stored(path: str, step: str, timeout: float = 60.0) -> list[tuple[str, str]]:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        with sqlite3.connect(path) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM provider_traces WHERE step_id = ?", (step,)
            ).fetchone()
        if count:
            return stored(path, step)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no trace of {step} after {timeout} s")


@pytest.fixture
async def big_gateway(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[RunningGateway]:
    async with running_gateway(settings_for(tmp_path, upstream)) as gw:
        yield gw


async def test_huge_answer_trace_is_scrubbed_off_the_loop(
    big_gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    gw = big_gateway
    answer = huge_answer(1_800_000, filler=12_000_000)  # ~30 MB: ~2 s of scrubbing
    upstream.script(Reply(json_body=completion(answer)))
    # A huge request too (over the inline bound), with the key in it: scrubbed before it is stored.
    prompt = "x" * 300_000 + f" my key {SERVER_KEY}"  # over trace_scrub.SCRUB_INLINE_MAX
    channel = grpc.aio.insecure_channel(gw.address, options=BIG_CHANNEL_OPTIONS)
    health = health_pb2_grpc.HealthStub(gw.channel)
    try:
        chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)

        async def big_call_and_its_trace() -> list[tuple[str, str]]:
            response = await chat.Create(request(upstream, "huge", prompt), timeout=120)
            assert SERVER_KEY not in response.completion.choices[0].message.content  # scrubbed too
            return await wait_stored(gw.settings.sqlite_path, "huge")

        big = asyncio.create_task(big_call_and_its_trace())
        completed, worst = 0, 0.0
        last = time.monotonic()
        while not big.done():
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now
            completed += 1
            await asyncio.sleep(0.01)
        rows = await big
    finally:
        await channel.close()
    assert completed >= 3, f"only {completed} tiny calls completed while the huge call ran"
    assert worst < MAX_GAP_S, f"a tiny call waited {worst:.2f} s: the loop was held"
    [(request_json, response_json)] = rows
    assert SERVER_KEY not in response_json and SERVER_KEY not in request_json
    assert f"the key is {REDACTED} done" in response_json
    assert f"my key {REDACTED}" in request_json
    assert len(response_json) > len(answer) // 2  # the answer itself is kept (its token= values redacted)


async def test_stop_while_a_trace_is_scrubbed_still_writes_it_scrubbed(
    big_gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    gw = big_gateway
    upstream.script(Reply(json_body=completion(huge_answer(1_200_000))))  # ~1.3 s of scrubbing
    channel = grpc.aio.insecure_channel(gw.address, options=BIG_CHANNEL_OPTIONS)
    try:
        chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        await chat.Create(request(upstream, "at-stop"), timeout=120)
    finally:
        await channel.close()
    assert stored(gw.settings.sqlite_path, "at-stop") == []  # still being scrubbed
    # What SIGTERM does: in-flight calls, then the trace writer, which waits up to max(grace, 5 s)
    # for scrubs still running; a loaded 2-core machine made this 1.3 s scrub take over 5 s.
    await gw.server.stop(grace=15.0)
    [(_, response_json)] = stored(gw.settings.sqlite_path, "at-stop")
    assert SERVER_KEY not in response_json
    assert f"the key is {REDACTED} done" in response_json


def test_redactor_scans_in_a_thread_while_secrets_change() -> None:
    """A scan in another thread never raises and finds every secret registered before it began.

    The loop thread keeps registering, replacing and dropping secrets, some with characters no
    other secret has (each changes a tier's byte table); the scanning thread checks each text
    against the secrets registered before its scan started. Afterwards every registered secret
    must still be found: a table cached stale by the scanning thread would miss one for good.
    """
    redactor = Redactor(["pinned-secret-0123456789abcdef0123456789"])
    registered: list[str] = []  # appended after each add returned
    stop = threading.Event()
    errors: list[BaseException] = []
    misses: list[str] = []

    def scan() -> None:
        try:
            while not stop.is_set():
                known = registered[-40:]
                text = "pre " + " | ".join(known) + " post"
                out = redactor.redact(text)
                # Live all through the scan: registered before it, still registered after it.
                misses.extend(s for s in known if s in out and s in redactor)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=scan)
    thread.start()
    try:
        for n in range(3000):
            rare = chr(0x100 + n % 600)  # a character (bytes) no other live secret has
            secret = f"owned-{n:05d}-{rare}-0123456789abcdef0123456789abcdef"
            redactor.add_owned(f"provider-{n % 50}", secret)  # replaces (drops) the provider's last
            registered.append(secret)
            if n % 50 == 49:
                del registered[:-50]  # only the live ones (one per provider) stay checked
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert not misses, misses[:3]
    live = registered[-50:]
    out = redactor.redact(" ".join(live))
    assert all(secret not in out for secret in live)


# --- TraceWriter.enqueue_after ------------------------------------------------------------------


async def test_flush_and_close_wait_for_traces_still_being_prepared() -> None:
    backend = MemoryBackend()
    writer = TraceWriter([backend])
    await writer.start()
    release = asyncio.Event()

    async def scrub(record: TraceRecord) -> None:
        await release.wait()
        record.response_json = "scrubbed"

    first, second = make_record(1), make_record(2)
    writer.enqueue_after(first, scrub(first))
    flushing = asyncio.create_task(writer.flush(timeout=5))
    await asyncio.sleep(0.05)
    assert not flushing.done() and backend.records == []
    release.set()
    await flushing
    assert [r.response_json for r in backend.records] == ["scrubbed"]
    release.clear()
    writer.enqueue_after(second, scrub(second))
    closing = asyncio.create_task(writer.close(timeout=5))
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing
    assert [r.step_id for r in backend.records] == ["step-1", "step-2"] and backend.closed


async def test_a_failed_or_late_scrub_drops_its_trace_never_writes_it_raw(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend()
    writer = TraceWriter([backend])
    await writer.start()

    async def fails() -> None:
        raise ValueError("boom")

    writer.enqueue_after(make_record(1), fails())
    await writer.flush(timeout=5)
    writer.enqueue_after(make_record(2), asyncio.Event().wait())  # never ready
    with caplog.at_level(logging.WARNING):
        await writer.close(timeout=0.2)
    assert backend.records == []
    assert writer.stats_for("memory").dropped == 2
    assert "its scrub did not finish" in caplog.text
