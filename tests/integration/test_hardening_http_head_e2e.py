"""Issue 12 item 13 through the real gateway: an upstream sending one endless header line, or
trickling a head that never ends, gets the caller a contract status with ErrorInfo, bounded by
the head limits and LLMGW_UPSTREAM_TIMEOUT, not by the caller's patience."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.integration.test_security_e2e import error_info, expect_error, expect_stream_error
from tests.unit.test_hardening_http_head import endless, trickle
from tests.unit.test_http_client import Peer, raw_server


async def endless_header(peer: Peer) -> None:
    await endless(peer, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long: ", b"a")


async def test_an_endless_header_line_ends_the_call_with_upstream_bad_response(tmp_path: Path) -> None:
    async with raw_server(endless_header) as server:
        base = server.url(path="/v1")
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(base,))) as gw:
            async with asyncio.timeout(60):  # a bound against hanging, not a measurement
                for error in (
                    await expect_error(gw.chat.Create(chat_request(base), timeout=60)),
                    await expect_stream_error(gw.chat.StreamCreate(chat_request(base), timeout=60)),
                ):
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                    info = error_info(error)
                    # Not retried (rev-net): the same upstream would answer the same head again.
                    assert info.reason == "UPSTREAM_BAD_RESPONSE" and info.domain == "llmgateway"
                    assert "head" in str(error.details())
        assert len(server.requests) == 2


async def test_a_trickled_head_of_a_stream_without_deadline_is_bounded(tmp_path: Path) -> None:
    async with raw_server(trickle) as server:
        base = server.url(path="/v1")
        settings = make_settings(tmp_path, allowed_endpoints=(base,), upstream_timeout=1.0)
        async with running_gateway(settings) as gw:
            async with asyncio.timeout(30):
                error = await expect_stream_error(gw.chat.StreamCreate(chat_request(base)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert error_info(error).reason == "UPSTREAM_UNAVAILABLE"
            assert len(server.requests) == 1  # a timeout is not retried
