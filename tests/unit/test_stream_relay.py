"""Stream relay: SSE events handed over a network read at a time, deltas merged without changing
what a client assembles (`deltas_from_chunks`), and the accumulator's seed rules."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server.core.completion import deltas_from_chunks
from server.core.stream import StreamAccumulator
from server.errors import RateLimitExceeded, UpstreamBadResponse
from server.providers import openai_compat
from server.providers.openai_compat import sse_batches, sse_events


def _chunk(delta: dict[str, Any], *, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def _atoms(events: list[chat_pb2.StreamCreateResponse]) -> list[tuple[Any, ...]]:
    """What a client reading the events in order sees, adjacent pieces of one thing joined."""
    atoms: list[tuple[Any, ...]] = []

    def add(key: tuple[Any, ...], text: str) -> None:
        if not text:
            return
        if atoms and atoms[-1][:-1] == key:
            atoms[-1] = (*key, atoms[-1][-1] + text)
        else:
            atoms.append((*key, text))

    for event in events:
        delta = event.delta
        add(("reasoning", delta.index), delta.reasoning_content)
        add(("content", delta.index), delta.content)
        for fragment in delta.tool_calls:
            add(("id", delta.index, fragment.index), fragment.id)
            add(("name", delta.index, fragment.index), fragment.name)
            add(("arguments", delta.index, fragment.index), fragment.arguments)
        if delta.finish_reason:
            atoms.append(("finish", delta.index, delta.finish_reason))
    return atoms


def _one_by_one(chunks: list[dict[str, Any]]) -> list[chat_pb2.StreamCreateResponse]:
    return [event for chunk in chunks for event in deltas_from_chunks([chunk])]


def test_content_of_one_read_is_one_event() -> None:
    chunks = [_chunk({"role": "assistant", "content": ""})]
    chunks += [_chunk({"content": f"tok{i} "}) for i in range(50)]
    chunks.append(_chunk({}, finish="stop"))
    chunks.append({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 1}})
    events = deltas_from_chunks([*chunks, None, _chunk({"content": "after [DONE]"})])
    assert len(events) == 1
    assert events[0].delta.content == "".join(f"tok{i} " for i in range(50))
    assert events[0].delta.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert _atoms(events) == _atoms(_one_by_one(chunks))


def test_one_chunk_is_relayed_as_before() -> None:
    chunk = _chunk({"content": "a", "reasoning_content": "r"}, index=1, finish="length")
    (event,) = deltas_from_chunks([chunk])
    assert event.delta == chat_pb2.ChatCompletionDelta(
        index=1, content="a", reasoning_content="r", finish_reason=chat_pb2.FINISH_REASON_LENGTH
    )
    assert deltas_from_chunks([_chunk({"role": "assistant"})]) == []
    assert deltas_from_chunks([_chunk({}, finish="unknown-reason")]) == []


def test_no_merging_across_kinds_choices_calls_or_a_finish() -> None:
    chunks = [
        _chunk({"reasoning_content": "Think"}),
        _chunk({"reasoning": "ing."}),
        _chunk({"content": "Hi"}),
        _chunk({"reasoning_content": "more"}),  # back to reasoning: a new event
        _chunk({"content": " there"}, index=1),  # another choice
        _chunk({"content": "!"}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"arguments": "{}"}}]}),
        _chunk({}, finish="tool_calls"),
        _chunk({"content": "late"}),  # after a finish reason: a new event
    ]
    events = deltas_from_chunks(chunks)
    deltas = [e.delta for e in events]
    assert [(d.index, d.reasoning_content, d.content) for d in deltas[:5]] == [
        (0, "Thinking.", ""),
        (0, "", "Hi"),
        (0, "more", ""),
        (1, "", " there"),
        (0, "", "!"),
    ]
    calls = deltas[5]
    assert [(t.index, t.id, t.name, t.arguments) for t in calls.tool_calls] == [
        (0, "call_a", "f", '{"a": 1}'),
        (1, "call_b", "g", ""),
        (1, "call_b", "", "{}"),  # a fragment with its own id is never folded into another
    ]
    assert calls.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert deltas[6].content == "late"
    assert len(deltas) == 7
    assert _atoms(events) == _atoms(_one_by_one(chunks))


def test_legacy_function_call_fragments() -> None:
    chunks = [
        _chunk({"function_call": {"name": "send", "arguments": ""}}),
        _chunk({"function_call": {"arguments": '{"x":'}}),
        _chunk({"function_call": {"arguments": " 1}"}}, finish="function_call"),
    ]
    (event,) = deltas_from_chunks(chunks)
    assert [(t.index, t.id, t.name, t.arguments) for t in event.delta.tool_calls] == [
        (0, "", "send", '{"x": 1}')
    ]
    assert event.delta.finish_reason == chat_pb2.FINISH_REASON_FUNCTION_CALL


def _random_delta(rng: random.Random) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    for key in ("content", "reasoning_content", "reasoning"):
        if rng.random() < 0.3:
            delta[key] = rng.choice(["", "a", "bc", " d"])
    if rng.random() < 0.3:
        fragments = []
        for _ in range(rng.randint(0, 2)):
            fragment: dict[str, Any] = {"index": rng.randint(0, 2), "function": {}}
            if rng.random() < 0.3:
                fragment["id"] = rng.choice(["call_a", "call_b"])
            if rng.random() < 0.3:
                fragment["function"]["name"] = rng.choice(["f", "g"])
            if rng.random() < 0.8:
                fragment["function"]["arguments"] = rng.choice(["", "{", '"k"', "}"])
            fragments.append(fragment)
        delta["tool_calls"] = fragments
    if rng.random() < 0.05:
        delta["function_call"] = {"name": rng.choice(["", "h"]), "arguments": rng.choice(["", "[]"])}
    return delta


def test_merging_never_changes_what_a_client_assembles() -> None:
    rng = random.Random(8)
    for _ in range(500):
        chunks = [
            _chunk(
                _random_delta(rng),
                index=rng.choice([0, 0, 0, 1]),
                finish=rng.choice([None] * 8 + ["stop", "tool_calls"]),
            )
            for _ in range(rng.randint(1, 12))
        ]
        merged = deltas_from_chunks(chunks)
        one_by_one = _one_by_one(chunks)
        assert _atoms(merged) == _atoms(one_by_one)
        assert len(merged) <= len(one_by_one)
        # The relay feeds every chunk to the accumulator either way: same completion.
        assembled = StreamAccumulator()
        for chunk in chunks:
            assembled.add(chunk)
        assert assembled.completion()["choices"]


def test_accumulator_seed_rules() -> None:
    accumulator = StreamAccumulator()
    accumulator.add({"id": "a", "model": "m1", "created": 5, "system_fingerprint": "fp", "choices": []})
    accumulator.add(_chunk({"role": "assistant", "content": "Hi"}) | {"id": "", "model": "m2"})
    accumulator.add({"choices": [{"index": 0, "delta": None, "finish_reason": "stop"}], "usage": {"x": 1}})
    body = accumulator.completion()
    assert (body["id"], body["model"], body["created"], body["system_fingerprint"]) == ("a", "m2", 1, "fp")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"x": 1}
    assert accumulator.finished and accumulator.chunks == 3


# -- SSE: a network read at a time -----------------------------------------------------------


class _FakeResponse:
    """Stands in for server.providers.http.Response: `read_chunk` hands out scripted reads."""

    def __init__(self, reads: list[bytes | BaseException]) -> None:
        self._reads = list(reads)
        self.reader_state: object = None

    async def read_chunk(self) -> bytes:
        await asyncio.sleep(0)
        if not self._reads:
            return b""
        read = self._reads.pop(0)
        if isinstance(read, BaseException):
            raise read
        return read


def _Response(reads: list[bytes | BaseException]) -> Any:  # noqa: N802 - stands in for a class
    return _FakeResponse(reads)


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events
    )


def _scrub(text: str) -> str:
    return text


async def _batches(response: Any) -> list[list[Any]]:
    return [batch async for batch in sse_batches(response, provider="p", scrub=_scrub)]


async def test_events_of_one_read_come_together() -> None:
    a, b, c = (_chunk({"content": x}) for x in "abc")
    split = _sse(c, "[DONE]")
    reads: list[bytes | BaseException] = [
        b": keep-alive\r\n\r\n" + _sse(a, b),
        split[:10],
        split[10:],
        _sse(a),  # after [DONE]: never read
    ]
    assert await _batches(_Response(reads)) == [[a, b], [c, None]]
    events = [e async for e in sse_events(_Response(reads), provider="p", scrub=_scrub)]
    assert events == [a, b, c, None]


async def test_body_without_done_and_a_trailing_event() -> None:
    a, b = (_chunk({"content": x}) for x in "ab")
    reads: list[bytes | BaseException] = [_sse(a), b"data: " + json.dumps(b).encode()]
    assert await _batches(_Response(reads)) == [[a], [b]]
    assert await _batches(_Response([])) == []


async def test_an_error_comes_after_the_events_before_it() -> None:
    a = _chunk({"content": "a"})
    error = {"error": {"message": "slow down", "code": 429}}
    batches = sse_batches(_Response([_sse(a, error, a)]), provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    with pytest.raises(RateLimitExceeded):
        await anext(batches)

    batches = sse_batches(_Response([_sse(a), b"data: {not json\n\n"]), provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    with pytest.raises(UpstreamBadResponse):
        await anext(batches)


async def test_transport_errors_are_translated() -> None:
    from server.providers.http import ServerDisconnectedError

    a = _chunk({"content": "a"})
    reads: list[bytes | BaseException] = [_sse(a), ServerDisconnectedError("reset")]
    batches = sse_batches(_Response(reads), provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    with pytest.raises(Exception) as raised:
        await anext(batches)
    assert "broke the stream" in str(raised.value)


async def test_primed_first_event_brings_the_rest_of_its_read() -> None:
    # open_stream reads the first event inside its retry loop and leaves it on the response.
    a, b, c = (_chunk({"content": x}) for x in "abc")
    response = _Response([_sse(a, b), _sse(c, "[DONE]")])
    events = openai_compat._iter_events(response, provider="p", scrub=_scrub)
    first = await anext(events)
    response.reader_state = openai_compat._Primed(events, first)
    assert await _batches(response) == [[a, b], [c, None]]
    assert response.reader_state is None


async def test_primed_first_event_is_not_kept_once_relayed() -> None:
    # A held stream kept its first chunk (~2 KiB parsed) for its whole life through `primed`.
    import gc

    a, b = (_chunk({"content": x}) for x in "ab")
    response = _Response([_sse(a), _sse(b), _sse("[DONE]")])
    events = openai_compat._iter_events(response, provider="p", scrub=_scrub)
    first = await anext(events)
    response.reader_state = openai_compat._Primed(events, first)
    batches = sse_batches(response, provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    assert await anext(batches) == [b]  # suspended again, past the first batch
    holders = [
        r for r in gc.get_referrers(first) if isinstance(r, openai_compat._Primed) or r is batches.ag_frame
    ]
    assert holders == []
    assert [batch async for batch in batches] == [[None]]


async def _primed(reads: list[bytes | BaseException]) -> Any:
    response = _Response(reads)
    events = openai_compat._iter_events(response, provider="p", scrub=_scrub)
    response.reader_state = openai_compat._Primed(events, await anext(events, openai_compat._END))
    return response


async def test_primed_streams_at_their_edges() -> None:
    # The primed first chunk is dropped once yielded: nothing after the yield may still need it.
    from server.providers.http import ServerDisconnectedError

    a, b = (_chunk({"content": x}) for x in "ab")
    assert await _batches(await _primed([_sse(a)])) == [[a]]  # one chunk, no [DONE]
    assert await _batches(await _primed([_sse(a, "[DONE]")])) == [[a, None]]
    assert await _batches(await _primed([_sse(a), _sse("[DONE]")])) == [[a], [None]]
    assert await _batches(await _primed([_sse("[DONE]"), _sse(a)])) == [[None]]  # [DONE] first
    assert await _batches(await _primed([])) == []  # an empty body

    error = {"error": {"message": "slow down", "code": 429}}
    batches = sse_batches(await _primed([_sse(a), _sse(b, error)]), provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    assert await anext(batches) == [b]
    with pytest.raises(RateLimitExceeded):
        await anext(batches)

    batches = sse_batches(
        await _primed([_sse(a), ServerDisconnectedError("reset")]), provider="p", scrub=_scrub
    )
    assert await anext(batches) == [a]
    with pytest.raises(Exception) as raised:
        await anext(batches)
    assert "broke the stream" in str(raised.value)

    batches = sse_batches(await _primed([_sse(a), _sse(b)]), provider="p", scrub=_scrub)
    assert await anext(batches) == [a]
    await batches.aclose()  # a client gone after the first batch


async def _reader_outcomes(next_batch: Any) -> list[Any]:
    out: list[Any] = []
    try:
        while batch := await next_batch():
            out.append(batch)
    except Exception as exc:  # noqa: BLE001 - the same error either way, whichever it is
        out.append((type(exc), str(exc), getattr(exc, "metadata", None)))
    return out


async def _opened(response: Any, how: str) -> Any:
    """The response as open_stream leaves it: its first event read (or not), per `how`."""
    if how == "fresh":
        return response
    if how == "other":  # a reader that is not the SSE parser (another dialect's, say)
        events: Any = sse_events(response, provider="p", scrub=_scrub)
    else:
        events = openai_compat._iter_events(response, provider="p", scrub=_scrub)
    try:
        first = await anext(events, openai_compat._END)
    except Exception:  # noqa: BLE001 - open_stream would have raised it: nothing to compare
        return None
    response.reader_state = openai_compat._Primed(events, first)
    return response


@pytest.mark.parametrize("seed", range(4))
async def test_sse_batch_reader_same_as_sse_batches(seed: int) -> None:
    """The stream loop's reader (the parser's own next_batch, no generator layer) gives exactly
    sse_batches' batches and errors: transport errors translated, primed or not, at any cut."""
    from server.providers.http import ServerDisconnectedError

    rng = random.Random(seed)
    events: list[dict[str, Any] | str] = [_chunk({"content": x}) for x in "abcdef"]
    events += ["[DONE]", {"error": {"message": "slow down", "code": 429}}, "{not json"]
    for _ in range(300):
        body = _sse(*(rng.choice(events) for _ in range(rng.randint(0, 6))))
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 4)))) if body else []
        reads: list[bytes | BaseException] = [
            body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]
        ]
        if rng.random() < 0.4:
            error = rng.choice([ServerDisconnectedError("reset"), TimeoutError(), ConnectionResetError("x")])
            reads.insert(rng.randint(0, len(reads)), error)
        how = rng.choice(["fresh", "primed", "other"])
        outcomes = []
        for reader in ("generator", "function"):
            response = await _opened(_Response(list(reads)), how)
            if response is None:
                break
            if reader == "generator":
                batches = sse_batches(response, provider="p", scrub=_scrub)
                next_batch: Any = lambda batches=batches: anext(batches, [])  # noqa: E731
            else:
                next_batch = openai_compat.sse_batch_reader(response, provider="p", scrub=_scrub)
            outcomes.append(await _reader_outcomes(next_batch))
            assert response.reader_state is None
        if outcomes:
            assert outcomes[0] == outcomes[1], (reads, how)
