"""The SSE one-event read and the decoder's template through the real gateway: an upstream
writing an edge-case stream one event per write (paced, so each read is one event and takes the
fast paths), all at once, or cut at random places answers the caller the same text, tool calls,
finish and usage (deltas may merge differently: one network read is relayed together).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
from aiohttp import web
from llmgateway.v1 import chat_pb2

from tests.gateway_harness import chat_request, make_settings, running_gateway
from tests.unit.test_http_client import aiohttp_server
from tests.unit.test_sse_template_edges import _body, _events


def _answer(events: list[chat_pb2.StreamCreateResponse]) -> tuple[str, str]:
    text = "".join(e.delta.content for e in events if e.WhichOneof("event") == "delta")
    final = [e for e in events if e.WhichOneof("event") == "completion"]
    return text, "|".join(e.completion.SerializeToString().hex() for e in final)


async def test_an_edge_case_stream_answers_the_same_however_the_upstream_writes_it(tmp_path: Path) -> None:
    body = _body(_events(), "spaced")
    per_event = [p + b"\n\n" for p in body.split(b"\n\n") if p]
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(body)), 25))
    random_cuts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    writes: list[list[bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in writes.pop(0):
            await response.write(piece)
            await asyncio.sleep(0.005)  # a read per write
        await response.write_eof()
        return response

    async with aiohttp_server(handler) as base_url:
        settings = make_settings(tmp_path, allowed_endpoints=(base_url,))
        async with running_gateway(settings) as gw:
            answers = []
            for pieces in ([body], per_event, random_cuts):
                writes.append(pieces)
                request = chat_pb2.StreamCreateRequest.FromString(chat_request(base_url).SerializeToString())
                try:
                    events = [e async for e in gw.chat.StreamCreate(request, timeout=20)]
                    answers.append(("ok", _answer(events)))
                except grpc.aio.AioRpcError as exc:
                    answers.append(("error", (exc.code(), exc.details())))
    assert answers[0][0] == "ok", answers[0]
    assert answers[1] == answers[0]
    assert answers[2] == answers[0]
