"""Review of h/net (issue 12 items 1 and 13): what a malicious upstream's unreadable answer maps to.

An answer whose head is over the limits or is no HTTP at all is "upstream answered something
unreadable": UNAVAILABLE UPSTREAM_BAD_RESPONSE, and not retried (the same upstream answers the
same bytes again; each attempt would read up to the head limit again). A refused, reset or
dropped connection stays UPSTREAM_UNAVAILABLE and retried. Raw loopback servers only.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from server.config import RetrySettings
from server.core.retry import Deadline, RetryableError
from server.errors import GatewayError, UpstreamBadResponse
from server.providers.base import UpstreamTarget
from server.providers.errors import connection_error
from server.providers.http import ConnectError, HttpClient, InvalidResponseError, ServerDisconnectedError
from server.providers.openai_compat import CallOptions, broken_stream, open_stream, post_json, sse_events
from tests.unit.test_hardening_http_head import endless
from tests.unit.test_http_client import Peer, raw_server


def _options(attempts: int = 3) -> CallOptions:
    return CallOptions(
        deadline=Deadline.after(20),
        retry=RetrySettings(initial_delay=0.0, jitter=0.0, max_attempts=attempts),
        default_timeout=20,
        scrub=lambda text: text,
    )


def test_unreadable_answers_are_bad_responses_and_dropped_connections_stay_retryable() -> None:
    bad = connection_error(InvalidResponseError("head over 65536 bytes"), provider="p", scrub=str)
    assert isinstance(bad, UpstreamBadResponse) and bad.reason == "UPSTREAM_BAD_RESPONSE"
    assert bad.metadata == {"provider": "p", "error_type": "InvalidResponseError"}
    for exc in (ConnectError("refused"), ServerDisconnectedError("closed mid-answer")):
        again = connection_error(exc, provider="p", scrub=str)
        assert isinstance(again, RetryableError) and again.error.reason == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Long: ",  # then endless
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",  # obs-fold
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP at all
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fffffffffffffffffff\r\n"
        ),  # chunk size overflow
    ],
)
async def test_an_unreadable_answer_is_sent_once(head: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await endless(peer, head, b"a", total=256 * 1024)

    async with raw_server(handler) as server:
        client = HttpClient()
        target = UpstreamTarget(server.url(path="/v1"), {}, "openai", private_ok=True)
        try:
            for call in (post_json, open_stream):
                async with asyncio.timeout(20):  # a bound against hanging, not a measurement
                    with pytest.raises(GatewayError) as raised:
                        await call(client, target, server.url(), b"{}", _options())
                assert raised.value.reason == "UPSTREAM_BAD_RESPONSE", raised.value.message
        finally:
            await client.close()
        assert len(server.requests) == 2  # one per call


async def test_a_stream_whose_framing_breaks_after_the_first_event_is_a_bad_response() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        event = b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(event), event)
        )
        await asyncio.sleep(0.05)
        await peer.send(b"zz\r\n")  # no chunk size
        await asyncio.sleep(5)

    async with raw_server(handler) as server:
        client = HttpClient()
        target = UpstreamTarget(server.url(path="/v1"), {}, "openai", private_ok=True)
        try:
            async with asyncio.timeout(20):
                response = await open_stream(client, target, server.url(), b"{}", _options())
                with pytest.raises(GatewayError) as raised:
                    async for _ in sse_events(response, provider="openai", scrub=str):
                        pass
        finally:
            await client.close()
        assert raised.value.reason == "UPSTREAM_BAD_RESPONSE", raised.value.message
        # A connection dropped mid-stream is still UPSTREAM_UNAVAILABLE.
        assert broken_stream(ServerDisconnectedError("gone"), "p", str).reason == "UPSTREAM_UNAVAILABLE"


async def test_the_local_key_is_not_lent_to_a_tenant_byok_url_on_the_unlisted_local_base_url() -> None:
    """LLMGW_LOCAL_BASE_URL names where the local key may go; reaching it needs
    LLMGW_ALLOWED_ENDPOINTS. A tenant's BYOK base URL on that host must not get the operator's
    key attached (it would use the operator's local server with the operator's credentials)."""
    from types import SimpleNamespace

    from llmgateway.v1 import chat_pb2

    from server.auth.actor import Actor
    from server.auth.endpoints import EndpointPolicy
    from server.config import Settings
    from server.providers.local.provider import _target

    local = "http://ollama.example.com:11434"
    key = "local-" + "k" * 24
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model="m", model_endpoint_type="ollama", model_endpoint=local)
    )

    async def byok_urls(organization_id: str) -> list[str]:
        return [local]  # the tenant registered a BYOK provider on the local server's URL

    for listed, expect_key in (((), False), ((local,), True)):
        settings = Settings(
            local_base_url=local, local_auth_type="bearer_token", local_api_key=key, allowed_endpoints=listed
        )
        deps = SimpleNamespace(
            settings=settings, policy=EndpointPolicy.from_settings(settings), byok_urls=byok_urls
        )
        target = await _target(SimpleNamespace(deps=deps), request, Actor(organization_id="org-a"))  # type: ignore[arg-type]
        assert (key in str(target.headers)) is expect_key, listed
        assert target.private_ok is expect_key


async def test_an_operator_lookup_never_waits_for_a_tenant_slot_on_a_shared_name() -> None:
    """A tenant may register a BYOK URL on the operator's own host outside the listed path
    (`https://api.openai.com/x`): its lookups are tenant lookups. When the tenant slots are held
    by slow names and a tenant lookup of that host is queued, the operator's calls to the same
    host (cache expired) must not join the queued tenant lookup and wait for a slot."""
    from server.auth.resolver import TENANT_LOOKUPS, SafeResolver
    from tests.unit.test_hardening_resolver_load import BlockingLookup

    lookup = BlockingLookup()
    resolver = SafeResolver(lookup)
    slow = [asyncio.ensure_future(resolver.resolve(f"n{i}.slow.test", 443)) for i in range(TENANT_LOOKUPS)]
    try:
        async with asyncio.timeout(5):
            while lookup.in_flight < TENANT_LOOKUPS:
                await asyncio.sleep(0)
        queued = asyncio.ensure_future(resolver.resolve("api.example.test", 443, private_ok=False))
        await asyncio.sleep(0)
        async with asyncio.timeout(2):  # the operator's lookup runs now, not after a tenant slot
            assert await resolver.resolve("api.example.test", 443, private_ok=True) == [
                (socket.AF_INET, "127.0.0.1")
            ]
    finally:
        lookup.release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*slow)
        with pytest.raises(OSError):  # 127.0.0.1 is no address for a tenant's call
            await queued
