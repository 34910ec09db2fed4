"""A burst of new calls that the worker cannot start at once waits for it: none is cancelled.

grpc core queues a call it has parsed until the worker's event loop asks for the next one; by
default it drops calls from that queue at random once 1,000 wait (a bare CANCELLED the gateway
never sees). The gateway sets the bound itself (LLMGW_GRPC_MAX_PENDING_CALLS, 4,000) with no
random drops below it. The burst here: the gateway process is stopped (SIGSTOP) while 2,500
calls are sent, then resumed: grpc core parses them all within milliseconds, long before the
loop has started them. With grpc's defaults 427 to 436 of the 2,500 ended CANCELLED (three runs).

The same queue at SIGTERM: grpc cancels every call still in it (bare CANCELLED) the moment
`server.stop()` begins. A deep queue takes longer to drain than the 1 s the gateway lets queued
calls start in, so what is left is refused instead, UNAVAILABLE SHUTTING_DOWN (retry elsewhere),
until the queue is empty: without that, 950 to 1,900 of 2,500 queued calls ended CANCELLED.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from llmgateway.v1 import chat_pb2, chat_pb2_grpc

from tests.fake_upstream import FakeUpstream, Reply, completion
from tests.gateway_harness import RunningGateway, chat_request
from tests.integration.test_hardening_shutdown import error_reason
from tests.process_harness import ServerProcess, async_server_process, start_server_process

CALLS = 2_500
CHANNELS = 10
# Writing 2,500 calls to the sockets of a stopped server: 0.1-0.2 s on a quiet machine.
SEND_TIME = 1.0
QUEUED = 50  # calls of each kind that wait in grpc's queue while the loop stalls
LOOP_STALL = 3.0

Stub = chat_pb2_grpc.ChatCompletionServiceStub


async def burst_while_stopped(
    server: ServerProcess,
    send: Callable[[Stub, int], Awaitable[object]],
    *,
    calls: int = CALLS,
    then_signal: int | None = None,
) -> list[object]:
    """Send `calls` calls while the server process is stopped, resume it, gather the outcomes.

    `then_signal` is sent once the first call is answered: every call is in grpc's queue then,
    and the loop is taking them (sent earlier, the signal could be handled before grpc has read
    the calls off the sockets on a loaded machine).
    """
    # Separate connections, as many clients would open (one connection carries them as well).
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        stubs = [Stub(channel) for channel in channels]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            futures = [asyncio.ensure_future(send(stubs[i % CHANNELS], i)) for i in range(calls)]
            await asyncio.sleep(SEND_TIME)  # every call written to the stopped server's sockets
        finally:
            os.kill(server.pid, signal.SIGCONT)
        if then_signal is not None:
            await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
            os.kill(server.pid, then_signal)
        return await asyncio.gather(*futures, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close()


async def test_a_burst_the_loop_cannot_start_at_once_is_answered_in_full(tmp_path: Path) -> None:
    request = chat_pb2.CountTokensRequest(  # answered by the gateway itself: no upstream needed
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            model_endpoint="https://api.openai.com/v1",
            context_window=8000,
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
    )
    async with async_server_process(tmp_path) as server:
        results = await burst_while_stopped(server, lambda stub, _: stub.CountTokens(request, timeout=60))
    failed = [r for r in results if isinstance(r, BaseException)]
    codes = {r.code() if isinstance(r, grpc.aio.AioRpcError) else repr(r) for r in failed}
    assert not failed, f"{len(failed)} of {CALLS} calls failed: {codes}"
    assert all(r.total_tokens > 0 for r in results if isinstance(r, chat_pb2.CountTokensResponse))


async def test_sigterm_with_a_deep_queue_refuses_what_it_cannot_start_never_a_bare_cancelled(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.default = Reply(json_body=completion(), delay=0.05)  # well inside the grace period
    server = await asyncio.to_thread(
        start_server_process,
        tmp_path,
        allowed_endpoints=[upstream.base_url],
        # Room to drain on a slow machine: refusing is fast, but each call still takes a loop turn.
        extra_args=["--grace-period", "20"],
    )
    request = chat_request(upstream.base_url)
    try:
        results = await burst_while_stopped(
            server, lambda stub, _: stub.Create(request, timeout=60), then_signal=signal.SIGTERM
        )
        code = await asyncio.to_thread(server.wait, 60)
    finally:
        server.close()
    assert code == 0, server.log[-3000:]
    outcomes: Counter[str] = Counter()
    for result in results:
        if isinstance(result, chat_pb2.CreateResponse):
            outcomes["OK"] += 1
        elif isinstance(result, grpc.aio.AioRpcError):
            outcomes[f"{result.code().name} {error_reason(result)}"] += 1
        else:
            outcomes[repr(result)] += 1
    # Every call was on the wire before the signal: each is answered, or refused in a way its
    # caller can act on (retry on another instance); none is cancelled unseen.
    assert set(outcomes) <= {"OK", "UNAVAILABLE SHUTTING_DOWN"}, f"{outcomes}\n{server.log[-2000:]}"
    # A refused call never reached the upstream (no work paid for and thrown away).
    assert len(upstream.requests) == outcomes["OK"], (len(upstream.requests), outcomes)


async def test_a_call_whose_deadline_passed_or_caller_left_while_queued_never_reaches_the_upstream(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    """A call may now wait in grpc's queue for minutes (PENDING_CALL_MAX_WAIT): one its caller
    gave up on meanwhile must not be sent upstream when the loop gets to it (paid for, unread)."""
    await gateway.chat.Create(chat_request(upstream.base_url), timeout=10)  # pools warm
    before = len(upstream.requests)
    request = chat_request(upstream.base_url)
    # A blocking client on its own threads: the test's loop (the gateway's) is about to stop.
    channel = grpc.insecure_channel(gateway.address)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = Stub(channel)
        sent: dict[str, list[grpc.Future]] = {}

        def send() -> None:
            sent["deadline"] = [stub.Create.future(request, timeout=0.5) for _ in range(QUEUED)]
            sent["cancelled"] = [stub.Create.future(request) for _ in range(QUEUED)]
            time.sleep(SEND_TIME)
            for future in sent["cancelled"]:
                future.cancel()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(LOOP_STALL)  # the gateway's loop stalls: grpc core queues the calls meanwhile
        sender.join()
        await asyncio.sleep(2.0)  # the loop takes the queued calls
        codes: Counter[str] = Counter()
        for kind, futures in sent.items():
            for future in futures:
                try:
                    future.result(timeout=10)
                    codes[f"{kind} OK"] += 1
                except grpc.FutureCancelledError:
                    codes[f"{kind} cancelled"] += 1
                except grpc.RpcError as error:
                    codes[f"{kind} {error.code().name}"] += 1
    finally:
        channel.close()
    assert codes == {"deadline DEADLINE_EXCEEDED": QUEUED, "cancelled cancelled": QUEUED}, codes
    assert len(upstream.requests) == before, f"{len(upstream.requests) - before} wasted upstream calls"
