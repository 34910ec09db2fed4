"""Past one machine: three real `llm-gateway serve` processes behind a real nginx (`grpc_pass`,
HTTP/2), sharing a real PostgreSQL for keys, BYOK providers and traces, under steady load from
clients through the balancer and with client-side round_robin (tests/scaleout.py).

- SIGKILL of one replica: only the calls it had in flight fail, never a stream that ends OK
  without its final completion; the other replicas keep answering; every completed call has its
  trace in PostgreSQL.
- SIGTERM of one replica (drain): no call fails.
- A key revoked with `llm-gateway keys revoke` is refused by every replica within the 5 s key
  cache (measured), and a BYOK provider created through one replica works through the others at
  once.
- A stream that waits longer than the connection age for its first token is not cut.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aiohttp import web
from llmgateway.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import chat_request
from tests.integration.test_errors_support import expect
from tests.redis_service import RedisServer
from tests.scaleout import (
    SERVICE_CONFIG,
    Cluster,
    retrying_channel_options,
    start_cluster,
    start_nginx,
    stop_cluster,
)
from tests.trace_polling import eventually
from tests.trace_services import PostgresServer, free_port, fresh_postgres_database

pytestmark = pytest.mark.slow

WORDS = [f"w{i} " for i in range(12)]
ANSWER = "".join(WORDS)
STREAM_CHUNK_DELAY = 0.1  # a stream takes ~1.2 s: several are in flight on every replica
UNARY_DELAY = 0.8
# Key cache of every replica (server/auth/store.py DEFAULT_CACHE_TTL): the documented bound.
KEY_CACHE_SECONDS = 5.0
SHARED_RPM = 6  # the per-key limit the three replicas share through Redis


class SlowUpstream(FakeUpstream):
    """The fake upstream, answering streams and unary calls slowly enough to be caught in flight."""

    first_token_delay = 0.0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            self.default = Reply(
                sse=text_stream(WORDS), delay=self.first_token_delay, chunk_delay=STREAM_CHUNK_DELAY
            )
        else:
            self.default = Reply(json_body=completion(ANSWER), delay=UNARY_DELAY)
        return await super()._handle(request)


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    fake = SlowUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The real Redis the replicas share for limits and cooldowns (tests/redis_service.py)."""
    return redis_server.url


@pytest.fixture
async def cluster(
    tmp_path: Path, slow_upstream: SlowUpstream, postgres_server: PostgresServer, redis_url: str
) -> AsyncIterator[Cluster]:
    dsn = await fresh_postgres_database(postgres_server)
    running = await start_cluster(
        tmp_path,
        replicas=3,
        postgres_dsn=dsn,
        allowed_endpoints=[slow_upstream.base_url],
        redis_url=redis_url,
    )
    try:
        yield running
    finally:
        await stop_cluster(running)


@dataclass
class Outcome:
    call_id: str
    kind: str  # "unary", "stream", "count"
    path: str  # "nginx", "direct" (client-side round_robin) or "pinned" (the victim alone)
    started: float  # time.time()
    ended: float
    code: str  # "OK" or the status code's name
    details: str = ""
    events: int = 0  # stream messages received
    complete: bool = False  # the answer arrived whole (a stream: ending with its completion)


def _request(upstream: FakeUpstream, step: str) -> chat_pb2.CreateRequest:
    return chat_request(upstream.base_url, trace=chat_pb2.TraceContext(step_id=step, run_id="scale"))


class Load:
    """Steady unary, stream and CountTokens calls; every outcome kept and checked."""

    def __init__(self, upstream: FakeUpstream, key: str) -> None:
        self.upstream = upstream
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.outcomes: list[Outcome] = []
        self._ids = itertools.count()
        self.first_events = 0  # pinned streams that have their first message
        self._stop = asyncio.Event()

    async def _call(self, chat: chat_pb2_grpc.ChatCompletionServiceStub, kind: str, path: str) -> None:
        call_id = f"{path}-{kind}-{next(self._ids)}"
        metadata = (*self.metadata, ("x-call-id", call_id))
        outcome = Outcome(call_id, kind, path, time.time(), 0.0, "OK")
        request = _request(self.upstream, call_id)
        call: Any
        try:
            if kind == "unary":
                call = chat.Create(request, metadata=metadata, timeout=30)
                answer = await call
                outcome.complete = answer.completion.choices[0].message.content == ANSWER
            elif kind == "count":
                count = chat_pb2.CountTokensRequest.FromString(request.SerializeToString())
                call = chat.CountTokens(count, metadata=metadata, timeout=30)
                outcome.complete = (await call).total_tokens > 0
            else:
                stream_request = chat_pb2.StreamCreateRequest.FromString(request.SerializeToString())
                call = chat.StreamCreate(stream_request, metadata=metadata, timeout=30)
                text, final = [], None
                async for event in call:
                    outcome.events += 1
                    if path == "pinned" and outcome.events == 1:
                        self.first_events += 1
                    if final is not None:
                        raise AssertionError(f"{call_id}: a message after the final completion")
                    if event.WhichOneof("event") == "delta":
                        text.append(event.delta.content)
                    else:
                        final = event.completion
                # Complete means: ended by its final completion, and that is the whole answer.
                outcome.complete = (
                    final is not None
                    and final.choices[0].message.content == ANSWER
                    and "".join(text) == ANSWER
                )
        except grpc.aio.AioRpcError as exc:
            outcome.code, outcome.details = exc.code().name, exc.details() or ""
        outcome.ended = time.time()
        self.outcomes.append(outcome)

    async def _worker(self, channel: grpc.aio.Channel, kind: str, path: str) -> None:
        chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        while not self._stop.is_set():
            await self._call(chat, kind, path)
            if kind == "count":
                await asyncio.sleep(0.05)

    def start_pinned(self, channel: grpc.aio.Channel, *, streams: int, unary: int) -> None:
        """One-off calls on a channel to a single replica (they are not repeated)."""
        chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
        self._pinned = [
            asyncio.create_task(self._call(chat, kind, "pinned"))
            for kind in ["stream"] * streams + ["unary"] * unary
        ]
        self._pinned_streams = streams

    async def pinned_running(self) -> None:
        """Until every pinned stream has its first message (the unary one is then in flight too)."""
        while self.first_events < self._pinned_streams:
            await asyncio.sleep(0.01)

    def start(self, channels: dict[str, grpc.aio.Channel], workers: dict[tuple[str, str], int]) -> None:
        self._pinned: list[asyncio.Task[None]] = []
        self._tasks = [
            asyncio.create_task(self._worker(channels[path], kind, path))
            for (path, kind), n in workers.items()
            for _ in range(n)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, *self._pinned), 60)


async def _traced_steps(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT step_id FROM provider_traces")
    finally:
        await conn.close()
    return {row["step_id"] for row in rows}


def _in_flight(outcome: Outcome, killed_at: float, dead_at: float) -> bool:
    """Whether the call had started when the victim died and had not ended when it was killed."""
    return outcome.started <= dead_at and outcome.ended >= killed_at


async def test_sigkill_fails_only_its_calls_and_sigterm_drains_without_failures(
    cluster: Cluster, slow_upstream: SlowUpstream
) -> None:
    _, key = await asyncio.to_thread(cluster.create_key, "acme")
    options = retrying_channel_options(cluster.service_config())
    async with (
        grpc.aio.insecure_channel(cluster.balancer.address, options=options) as via_nginx,
        grpc.aio.insecure_channel(cluster.direct_target(), options=options) as direct,
        grpc.aio.insecure_channel(cluster.replicas[0].address, options=options) as pinned,
    ):
        load = Load(slow_upstream, key)
        load.start(
            {"nginx": via_nginx, "direct": direct},
            {
                ("nginx", "unary"): 6,
                ("nginx", "stream"): 8,
                ("nginx", "count"): 1,
                ("direct", "unary"): 2,
                ("direct", "stream"): 3,
            },
        )
        await asyncio.sleep(3.0)
        victim, drained = cluster.replicas[0], cluster.replicas[1]
        # A client connected to the victim alone, with a unary call and streams under way (the
        # streams have their first delta) when it dies.
        load.start_pinned(pinned, streams=2, unary=1)
        await load.pinned_running()
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)
        dead_at = time.time()  # the signal is delivered, and the process reaped, in between
        await asyncio.sleep(3.0)
        drain_at = time.time()
        drained.send_signal(signal.SIGTERM)
        drain_code = await asyncio.to_thread(drained.wait, 60)
        drain_done = time.time()
        await asyncio.sleep(3.0)
        await load.stop()

    outcomes = load.outcomes
    assert drain_code == 0, drained.log[-3000:]
    balanced = cluster.balancer.calls()
    failed = [o for o in outcomes if o.code != "OK"]
    short = [o for o in outcomes if o.code == "OK" and not o.complete]
    # Never an answer that ends OK but is not whole (a stream without its final completion).
    assert not short, f"{len(short)} calls ended OK with a short answer: {short[:3]}"

    # SIGKILL: every failure is a call in flight at the kill, and via nginx one nginx had sent to
    # the killed replica. Via nginx, an answer not yet started fails UNAVAILABLE (nginx's 502,
    # turned into gRPC status 14 by grpc-proxy.conf); a stream already sending deltas can only be
    # reset by the proxy (RST_STREAM INTERNAL_ERROR: the client sees INTERNAL). Direct
    # to the replica (round_robin, or the pinned channel) the client sees the connection drop:
    # UNAVAILABLE, a stream under way included.
    for o in failed:
        assert _in_flight(o, killed_at, dead_at), f"{o} failed but was not in flight at the kill"
        if o.path == "nginx":
            logged = balanced[o.call_id]
            assert logged.upstreams == (victim.address,), (o, logged)
            if o.events == 0:
                assert o.code == "UNAVAILABLE", o
            else:
                assert o.code == "INTERNAL" and "RST_STREAM" in o.details, o
        else:
            assert o.code == "UNAVAILABLE", o
    # CountTokens is idempotent: the service config retries its UNAVAILABLE elsewhere.
    assert not [o for o in failed if o.kind == "count"]
    # The kill did catch calls in flight (else this test proves nothing), and no more than the
    # victim had: nginx's log says which calls it had sent there and which spanned the kill.
    on_victim = {
        c.call_id for c in balanced.values() if c.upstreams[:1] == (victim.address,) and c.started <= dead_at
    }
    failed_nginx = {o.call_id for o in failed if o.path == "nginx"}
    assert failed_nginx, "no nginx call was in flight on the killed replica"
    assert failed_nginx <= on_victim
    pinned = [o for o in outcomes if o.path == "pinned"]
    assert len(pinned) == 3 and all(o.code == "UNAVAILABLE" for o in pinned), pinned
    assert sum(o.events > 0 for o in pinned) == 2, pinned

    # The others kept answering, through nginx and directly, after the kill and after the drain.
    for path in ("nginx", "direct"):
        for since in (killed_at + 0.5, drain_done):
            answered = [o for o in outcomes if o.path == path and o.started > since and o.complete]
            assert len(answered) >= 5, (path, since, len(answered), cluster.logs())

    # SIGTERM drain: no call failed that was not in flight at the kill.
    late = [o for o in failed if o.started > dead_at]
    assert not late, f"calls failed after the kill (during the drain?): {late[:5]}"
    drained_calls = [c for c in balanced.values() if drained.address in c.upstreams and c.ended >= drain_at]
    assert drained_calls, "the drained replica had no call in flight when it got SIGTERM"

    # Every completed Create/StreamCreate has its trace in the shared PostgreSQL.
    steps = await _traced_steps(cluster.env["LLMGW_POSTGRES_DSN"])
    completed = [o for o in outcomes if o.complete and o.kind != "count"]
    missing = [o for o in completed if o.call_id not in steps]
    in_flight_on_victim = on_victim & {o.call_id for o in outcomes if _in_flight(o, killed_at, dead_at)}
    print(
        f"\nscale-out: {len(outcomes)} calls; at the SIGKILL (reaped "
        f"{1000 * (dead_at - killed_at):.0f} ms after the signal) {len(failed_nginx)} failed via nginx "
        f"({len(in_flight_on_victim)} were in flight on the victim), "
        f"{len([o for o in failed if o.path == 'direct'])} via round_robin, 3 of 3 pinned; "
        f"0 at the SIGTERM drain ({len(drained_calls)} calls ended on the draining replica after "
        f"the signal); {len(missing)} completed calls without a trace; failures: "
        + ", ".join(
            f"{n} {path} {kind} {code}"
            for (path, kind, code), n in Counter((o.path, o.kind, o.code) for o in failed).items()
        )
    )
    assert not missing, (
        f"{len(missing)} of {len(completed)} completed calls have no trace: {missing[:5]}; "
        f"nginx: {[balanced.get(o.call_id) for o in missing[:5]]}; killed {killed_at:.3f}, dead "
        f"{dead_at:.3f}, drain {drain_at:.3f}-{drain_done:.3f}; victim {victim.address}, drained "
        f"{drained.address}\n{cluster.logs()[-6000:]}"
    )
    # And any replica reads them: through nginx, the killed replica's traces included.
    on_victim_ok = [
        o for o in completed if o.path == "nginx" and balanced[o.call_id].upstreams == (victim.address,)
    ]
    sample = [*on_victim_ok[:3], *completed[-3:]]
    async with grpc.aio.insecure_channel(cluster.balancer.address, options=options) as via_nginx:
        reader = traces_pb2_grpc.ProviderTraceServiceStub(via_nginx)
        for o in sample:
            found = await reader.GetProviderTrace(
                traces_pb2.GetProviderTraceRequest(step_id=o.call_id),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=10,
            )
            assert found.trace.step_id == o.call_id
    assert len(on_victim_ok) >= 3, "the victim completed no calls before it was killed"


async def _early_in_a_minute() -> None:
    """Limits count per UTC minute: start a burst with at least 10 s of its minute left."""
    second = time.time() % 60
    if second > 50:
        await asyncio.sleep(60.2 - second)


async def test_revocation_byok_and_limits_reach_every_replica(
    cluster: Cluster, slow_upstream: SlowUpstream, redis_server: RedisServer
) -> None:
    key_id, key = await asyncio.to_thread(cluster.create_key, "acme")
    _, admin = await asyncio.to_thread(cluster.create_key, "acme", admin=True)
    limited_id, limited = await asyncio.to_thread(cluster.create_key, "acme")
    await asyncio.to_thread(cluster.cli, "keys", "limits", "--key", limited_id, "--rpm", str(SHARED_RPM))
    channels = [grpc.aio.insecure_channel(r.address) for r in cluster.replicas]
    try:
        chats = [chat_pb2_grpc.ChatCompletionServiceStub(c) for c in channels]

        # Shared limits: 2N calls at once through nginx, which spreads them over the 3 replicas;
        # exactly N reach the upstream whichever replica serves them, the others are refused
        # QUOTA_EXCEEDED. Then call N+1 is refused by every replica (one Redis counter).
        await _early_in_a_minute()
        minute = int(time.time() // 60)
        upstream_before = len(slow_upstream.requests)
        limited_metadata = ("authorization", f"Bearer {limited}")

        async def limited_call(chat: chat_pb2_grpc.ChatCompletionServiceStub, call_id: str) -> str:
            try:
                await chat.Create(
                    _request(slow_upstream, call_id),
                    metadata=(limited_metadata, ("x-call-id", call_id)),
                    timeout=20,
                )
                return "ok"
            except grpc.aio.AioRpcError as exc:
                expect(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
                return "refused"

        async with grpc.aio.insecure_channel(cluster.balancer.address) as via_nginx:
            balanced_chat = chat_pb2_grpc.ChatCompletionServiceStub(via_nginx)
            ids = [f"limit-{i}" for i in range(2 * SHARED_RPM)]
            results = await asyncio.gather(*(limited_call(balanced_chat, i) for i in ids))
        after_each = [await limited_call(chat, f"limit-direct-{i}") for i, chat in enumerate(chats)]
        assert int(time.time() // 60) == minute, "the burst crossed a UTC minute: its window rolled"
        assert Counter(results) == {"ok": SHARED_RPM, "refused": SHARED_RPM}, results
        assert after_each == ["refused"] * 3
        assert len(slow_upstream.requests) - upstream_before == SHARED_RPM
        # nginx writes a call's log line as it ends: wait for every one of the burst's.
        await eventually(
            lambda: set(ids) <= cluster.balancer.calls().keys(), message="nginx never logged the burst"
        )
        served = cluster.balancer.calls()
        replicas_used = {served[i].upstreams[-1] for i in ids}
        assert replicas_used == {r.address for r in cluster.replicas}, replicas_used
        counter = redis_server.client().get(f"llmgw:limit:key:{limited_id}:requests_per_minute:{minute}")
        assert counter is not None and int(counter) == SHARED_RPM, counter
        count = chat_pb2.CountTokensRequest.FromString(
            _request(slow_upstream, "revocation").SerializeToString()
        )

        async def accepted(i: int, token: str) -> bool:
            try:
                await chats[i].CountTokens(
                    count, metadata=(("authorization", f"Bearer {token}"),), timeout=10
                )
                return True
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                return False

        # BYOK: replica 2 looked up the organization's providers (none yet) just before; the
        # provider created through replica 0 still works through replicas 1 and 2 at once.
        byok_config = chat_pb2.LLMConfig(
            model="gpt-4o-mini",
            model_endpoint_type="openai",
            provider_name="tenant-openai",
            provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
            context_window=128_000,
        )
        byok_request = chat_pb2.CreateRequest(
            llm_config=byok_config,
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
            trace=chat_pb2.TraceContext(step_id="byok"),
        )
        admin_metadata = (("authorization", f"Bearer {admin}"),)
        with pytest.raises(grpc.aio.AioRpcError) as before:
            await chats[2].Create(byok_request, metadata=admin_metadata, timeout=10)
        assert before.value.code() == grpc.StatusCode.NOT_FOUND
        await providers_pb2_grpc.ProviderServiceStub(channels[0]).CreateProvider(
            providers_pb2.CreateProviderRequest(
                name="tenant-openai",
                model_endpoint_type="openai",
                base_url=slow_upstream.base_url,
                api_key="sk-tenant-0123456789abcdef",
            ),
            metadata=admin_metadata,
            timeout=10,
        )
        created_at = time.monotonic()
        for i in (1, 2):
            answer = await chats[i].Create(byok_request, metadata=admin_metadata, timeout=10)
            assert answer.completion.choices[0].message.content == ANSWER
        byok_seconds = time.monotonic() - created_at
        tenant_calls = [
            r for r in slow_upstream.requests if r.headers.get("Authorization", "").endswith("abcdef")
        ]
        assert len(tenant_calls) == 2

        # Revocation: every replica has the key cached (a call just now), then the CLI revokes it.
        for i in range(3):
            assert await accepted(i, key)
        await asyncio.to_thread(cluster.cli, "keys", "revoke", key_id)
        revoked_at = time.monotonic()
        refused_after: dict[int, float] = {}
        while len(refused_after) < 3 and time.monotonic() - revoked_at < KEY_CACHE_SECONDS + 3:
            for i in range(3):
                if i not in refused_after and not await accepted(i, key):
                    refused_after[i] = time.monotonic() - revoked_at
            await asyncio.sleep(0.05)
        assert len(refused_after) == 3, f"still accepted after {KEY_CACHE_SECONDS + 3} s: {refused_after}"
        worst = max(refused_after.values())
        # Within the documented cache time of the revocation (plus one poll of slack).
        assert worst <= KEY_CACHE_SECONDS + 0.5, refused_after
        # And once refused, refused for good, by every replica and through the balancer.
        async with grpc.aio.insecure_channel(cluster.balancer.address) as via_nginx:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(via_nginx)
            for _ in range(6):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await chat.CountTokens(count, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for i in range(3):
            assert not await accepted(i, key)
        print(
            f"\nscale-out: revocation refused by all 3 replicas {worst:.2f} s after `keys revoke` returned "
            f"(each: {', '.join(f'{v:.2f}' for v in refused_after.values())} s); the BYOK provider created "
            f"through replica 0 answered through replicas 1 and 2 on their first call ({byok_seconds:.2f} s "
            f"for both Create calls, no wait for a cache); a {SHARED_RPM}/min key limit let exactly "
            f"{SHARED_RPM} of {2 * SHARED_RPM} calls through nginx over {len(replicas_used)} replicas"
        )
    finally:
        for c in channels:
            await c.close()


async def test_a_slow_first_token_outlives_the_connection_age(
    tmp_path: Path, slow_upstream: SlowUpstream, postgres_server: PostgresServer
) -> None:
    """With a 1 s connection age, a stream whose first token takes 3 s still ends whole, through
    nginx and directly; calls started after the age went on a new connection and succeed too."""
    dsn = await fresh_postgres_database(postgres_server)
    running = await start_cluster(
        tmp_path,
        replicas=1,
        postgres_dsn=dsn,
        allowed_endpoints=[slow_upstream.base_url],
        extra_env={"LLMGW_GRPC_MAX_CONNECTION_AGE": "1", "LLMGW_GRPC_KEEPALIVE_TIME": "1"},
    )
    try:
        _, key = await asyncio.to_thread(running.create_key, "acme")
        metadata = (("authorization", f"Bearer {key}"),)
        slow_upstream.first_token_delay = 3.0

        async def stream_through(target: str) -> str:
            async with grpc.aio.insecure_channel(target) as channel:
                chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
                request = chat_pb2.StreamCreateRequest.FromString(
                    _request(slow_upstream, f"slow-{target}").SerializeToString()
                )
                events = [e async for e in chat.StreamCreate(request, metadata=metadata, timeout=30)]
                assert events[-1].WhichOneof("event") == "completion"
                # A second call on the same channel, after the server aged its connection out.
                after = await chat.CountTokens(
                    chat_pb2.CountTokensRequest.FromString(request.SerializeToString()),
                    metadata=metadata,
                    timeout=10,
                )
                assert after.total_tokens > 0
                return str(events[-1].completion.choices[0].message.content)

        texts = await asyncio.gather(
            stream_through(running.balancer.address), stream_through(running.replicas[0].address)
        )
        assert texts == [ANSWER, ANSWER]
    finally:
        await stop_cluster(running)


async def test_a_grace_shorter_than_the_first_token_wait_cuts_the_stream(
    tmp_path: Path, slow_upstream: SlowUpstream, postgres_server: PostgresServer
) -> None:
    """The control of the test above: the connection age is really applied, and the grace is what
    keeps the slow stream alive. With 0.5 s of grace the stream is cut, with UNAVAILABLE, never
    with a short answer."""
    dsn = await fresh_postgres_database(postgres_server)
    running = await start_cluster(
        tmp_path,
        replicas=1,
        postgres_dsn=dsn,
        allowed_endpoints=[slow_upstream.base_url],
        extra_env={"LLMGW_GRPC_MAX_CONNECTION_AGE": "1", "LLMGW_GRPC_MAX_CONNECTION_AGE_GRACE": "0.5"},
    )
    try:
        _, key = await asyncio.to_thread(running.create_key, "acme")
        slow_upstream.first_token_delay = 4.0
        async with grpc.aio.insecure_channel(running.replicas[0].address) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            request = chat_pb2.StreamCreateRequest.FromString(
                _request(slow_upstream, "cut").SerializeToString()
            )
            call = chat.StreamCreate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for event in call:
                    assert event.WhichOneof("event") != "completion", "a cut stream looked complete"
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
    finally:
        await stop_cluster(running)


async def test_the_balancer_answers_unavailable_and_clients_retry_only_idempotent_calls(
    tmp_path: Path, slow_upstream: SlowUpstream
) -> None:
    """nginx with no replica it can reach: its 502 arrives as gRPC UNAVAILABLE with a status
    (deploy/nginx/grpc-proxy.conf), the service config retries CountTokens (4 attempts in nginx's
    log) and never Create (1 attempt)."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    balancer = await asyncio.to_thread(start_nginx, tmp_path / "nginx", [dead])
    try:
        options = retrying_channel_options(SERVICE_CONFIG.read_text())
        async with grpc.aio.insecure_channel(balancer.address, options=options) as channel:
            chat = chat_pb2_grpc.ChatCompletionServiceStub(channel)
            request = _request(slow_upstream, "nowhere")
            count = chat_pb2.CountTokensRequest.FromString(request.SerializeToString())
            for name, call in (
                ("count", chat.CountTokens(count, metadata=(("x-call-id", "count"),), timeout=20)),
                ("create", chat.Create(request, metadata=(("x-call-id", "create"),), timeout=20)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (name, failed.value)
                assert failed.value.details() == "llm-gateway replica unavailable", name
        # nginx writes its access log line as each attempt ends: wait for the five expected.
        access_log = balancer.workdir / "access.log"
        await eventually(
            lambda: len(access_log.read_text().splitlines()) >= 5, message="nginx never logged the attempts"
        )
        attempts = Counter(line.split(" ")[2] for line in access_log.read_text().splitlines())
        assert attempts == {"count": 4, "create": 1}, attempts
    finally:
        await asyncio.to_thread(balancer.stop)
