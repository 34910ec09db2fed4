"""The stream pipeline's fast paths for the usual chunk give exactly what the general code gives.

Each fast path (the SSE parser's one-event read, check_shape's plain delta, the accumulator's
content-only delta, `relay.relayed` with `plain_choice`/`plain_event`/`AnswerScrubber.lets_out`,
`Redactor.may_touch`) is compared, on many random chunks and streams, with a reference: the code
as it was before them (copied below), or the general path of the same code.
"""

from __future__ import annotations

import random
import string
import time
from typing import Any

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.api.handlers import server_stream
from server.auth.redact import _FEW_HEADS, _WALK_CHARS, Redactor
from server.core import tool_call_check
from server.core.answer_scrub import AnswerScrubber
from server.core.completion import (
    MAX_CHOICES,
    _add_fragment,
    _PendingDelta,
    answer_too_large,
    deltas_from_chunks,
    finish_reason,
    plain_choice,
    plain_event,
    text_bytes,
    text_of,
    too_many,
)
from server.core.relay import plain_wire, relayed
from server.core.stream import StreamAccumulator, _ChoiceParts
from server.errors import GatewayError
from server.providers import openai_compat
from server.providers.openai_compat import (
    _INT64_MAX,
    OpenAIStreamDecoder,
    _bad_shape,
    _check_message,
    _check_usage,
    _is_int,
    _SSEParser,
    check_shape,
)

# -- references: the code before the fast paths --------------------------------------------


def reference_check_shape(payload: dict[str, Any], *, provider: str) -> None:
    choices = payload.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise _bad_shape(provider, "choices")
        if len(choices) > MAX_CHOICES:
            raise too_many(provider, "choices", len(choices), MAX_CHOICES)
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _bad_shape(provider, f"choices[{i}]")
            get = choice.get
            index = get("index")
            if index is not None and not _is_int(index, MAX_CHOICES - 1):
                raise _bad_shape(provider, f"choices[{i}].index")
            finish, text = get("finish_reason"), get("text")
            if (finish is not None and not isinstance(finish, str)) or (
                text is not None and not isinstance(text, str)
            ):
                raise _bad_shape(provider, f"choices[{i}]")
            message = get("message")
            if message is not None:
                _check_message(message, provider, f"choices[{i}].message")
            delta = get("delta")
            if delta is not None:
                _check_message(delta, provider, f"choices[{i}].delta")
    created = payload.get("created")
    if (
        created is not None
        and not _is_int(created, _INT64_MAX)
        and not (isinstance(created, float) and 0 <= created <= 2**62)
    ):
        raise _bad_shape(provider, "created")
    usage = payload.get("usage")
    if usage is not None:
        _check_usage(usage, provider)


class ReferenceAccumulator(StreamAccumulator):
    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        get = chunk.get
        value = get("id")
        if value:
            self.id = value
        value = get("model")
        if value:
            self.model = value
        value = get("created")
        if value:
            self.created = int(value)
        value = get("system_fingerprint")
        if value:
            self.system_fingerprint = value
        value = get("usage")
        if value:
            self.usage = value
        for choice in get("choices") or ():
            index = int(choice.get("index") or 0)
            parts = self.choices.get(index)
            if parts is None:
                if len(self.choices) >= MAX_CHOICES:
                    raise too_many(self.provider, "choices", len(self.choices) + 1, MAX_CHOICES)
                parts = self.choices[index] = _ChoiceParts()
            delta = choice.get("delta")
            if delta:
                text = text_of(delta.get("content"))
                if text:
                    size = self.size + (len(text) if text.isascii() else text_bytes(text))
                    if size > self.max_answer_bytes:
                        raise answer_too_large(self.provider, self.max_answer_bytes, size)
                    self.size = size
                    parts.content.append(text)
                self._add_rest(parts, delta)
            reason = choice.get("finish_reason")
            if reason:
                parts.finish_reason = reason


def reference_deltas(chunks: list[dict[str, Any] | None]) -> list[chat_pb2.StreamCreateResponse]:
    events: list[chat_pb2.StreamCreateResponse] = []
    pending: _PendingDelta | None = None
    for chunk in chunks:
        if chunk is None:
            break
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = text_of(delta.get("reasoning_content") or delta.get("reasoning"))
            content = text_of(delta.get("content"))
            calls = delta.get("tool_calls")
            legacy = delta.get("function_call")
            reason = finish_reason(choice.get("finish_reason"))
            if reasoning:
                first = last = 1
                if content:
                    last = 2
            elif content:
                first = last = 2
            else:
                first = last = 0
            if calls or legacy:
                last = 3
                first = first or 3
            if not (last or reason):
                continue
            index = int(choice.get("index") or 0)
            if (
                pending is None
                or pending.index != index
                or pending.finish
                or (first and (first != last or first != pending.kind))
            ):
                if pending is not None:
                    events.append(pending.event())
                pending = _PendingDelta(index)
            if last:
                pending.kind = last
            if reasoning:
                pending.reasoning.append(reasoning)
            if content:
                pending.content.append(content)
            fragments = pending.fragments
            for fragment in calls or ():
                function = fragment.get("function") or {}
                _add_fragment(
                    fragments,
                    int(fragment.get("index") or 0),
                    fragment.get("id") or "",
                    function.get("name") or "",
                    function.get("arguments") or "",
                )
            if legacy:
                _add_fragment(fragments, 0, "", legacy.get("name") or "", legacy.get("arguments") or "")
            if reason:
                pending.finish = reason
    if pending is not None:
        events.append(pending.event())
    return events


class ReferenceScrubber(AnswerScrubber):
    """The scrubber before `lets_out` and `may_touch`: every delta through `_cut`."""

    __slots__ = ()

    def lets_out(self, content: str) -> bool:
        return False

    def _channel(self, channel: tuple[int, int, int], text: str) -> str:
        held = self._held.pop(channel, None)
        pending = held + text if held else text
        if self._context and channel in self._context:
            pending = self._continued(self._context.pop(channel), pending)
        cut, known = self._cut(pending)
        if cut < len(pending):
            self._held[channel] = pending[cut:]
            pending = pending[:cut]
        return self.text(pending) if known else pending


class LineParser(_SSEParser):
    """The SSE parser without its one-event fast path."""

    def _feed(self, piece: bytes) -> list[dict[str, Any] | None]:
        return self._feed_lines(piece)


# -- random chunks --------------------------------------------------------------------------

SECRETS = ["sk-secret-value-123456789", "llmgw_0123456789abcdef_s3cr3t", "AIzaSyA-key-with/slash&amp"]


def _text(rng: random.Random) -> str:
    pieces = ["tok ", "s", "sk", "sk-", "l", "ll", " and ", "é", "日本", "\n", "A", "AIz", ""]
    pieces += [s[: rng.randint(1, len(s))] for s in SECRETS]
    pieces += [s[rng.randint(0, len(s) - 1) :] for s in SECRETS]
    pieces += SECRETS
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))


def _maybe(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


def _delta(rng: random.Random, plain: float) -> Any:
    if _maybe(rng, plain):
        delta: dict[str, Any] = {"content": _text(rng)}
        if _maybe(rng, 0.2):
            delta["role"] = "assistant"
        return delta
    delta = {}
    if _maybe(rng):
        delta["content"] = (
            _text(rng)
            if _maybe(rng, 0.6)
            else rng.choice(["", None, [{"text": _text(rng)}, {"type": "x"}], [], 5, [{"text": 3}]])
        )
    if _maybe(rng, 0.2):
        delta["role"] = rng.choice(["assistant", None, 1])
    if _maybe(rng, 0.3):
        delta[rng.choice(["reasoning_content", "reasoning"])] = (
            _text(rng) if _maybe(rng, 0.7) else rng.choice(["", None, 7])
        )
    if _maybe(rng, 0.1):
        delta["refusal"] = rng.choice([_text(rng), None, 1.5])
    if _maybe(rng, 0.3):
        calls = []
        for _ in range(rng.randint(0, 3)):
            call: dict[str, Any] = {}
            if _maybe(rng, 0.8):
                call["index"] = rng.choice([0, 0, 1, 2, None, -1, True])
            if _maybe(rng, 0.4):
                call["id"] = rng.choice(["call_1", "call_2", _text(rng), None])
            if _maybe(rng, 0.9):
                call["function"] = {
                    k: v
                    for k, v in (("name", rng.choice(["f", "g", _text(rng)])), ("arguments", _text(rng)))
                    if _maybe(rng, 0.7)
                }
            calls.append(call)
        delta["tool_calls"] = rng.choice([calls, calls, None, "x"])
    if _maybe(rng, 0.05):
        delta["function_call"] = {"name": "f", "arguments": _text(rng)}
    if _maybe(rng, 0.1):
        delta["x_unknown"] = _text(rng)
    if _maybe(rng, 0.03):
        return rng.choice([None, "text", 3, []])
    return delta


def _chunk(rng: random.Random, plain: float = 0.7) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": rng.choice([1760000000, 1760000000, 1.5e9, 0, None, -1, True, "x", 2**63]),
        "model": rng.choice(["m", "m", "", None]),
    }
    if _maybe(rng, 0.1):
        chunk["usage"] = rng.choice(
            [{"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, {"prompt_tokens": -1}, 3]
        )
    if _maybe(rng, 0.1):
        chunk["choices"] = rng.choice([[], None, "x"])
        return chunk
    choices = []
    for _ in range(1 if _maybe(rng, 0.85) else rng.randint(0, 3)):
        choice: dict[str, Any] = {"delta": _delta(rng, plain), "logprobs": None}
        if _maybe(rng, 0.9):
            choice["index"] = rng.choice([0, 0, 0, 1, 2, None, True, -1, 16, 1.0])
        choice["finish_reason"] = rng.choice(
            [None, None, None, None, "stop", "length", "tool_calls", "weird", "", 3]
        )
        if _maybe(rng, 0.05):  # a text completion's field, or a whole message, of any type
            choice[rng.choice(["text", "message"])] = rng.choice(["x", 1, None, {"content": 2}, {}])
        if _maybe(rng, 0.02):
            choice = rng.choice(["x", 1])  # type: ignore[assignment]
        choices.append(choice)
    chunk["choices"] = choices
    return chunk


def _outcome(f: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", f(*args, **kwargs)
    except GatewayError as exc:
        return "error", (type(exc), str(exc), getattr(exc, "metadata", None))
    except Exception as exc:  # noqa: BLE001 - the general code's own crash must be the same too
        return "crash", type(exc)


# -- the comparisons -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_check_shape_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3000):
        chunk = _chunk(rng)
        assert _outcome(check_shape, chunk, provider="p") == _outcome(
            reference_check_shape, chunk, provider="p"
        ), chunk


def test_check_shape_index_and_created_bounds() -> None:
    values: list[Any] = [None, 0, 1, 15, 16, -1, True, False, 1.0, 2**63 - 1, 2**63, "1", 1.5e9, -0.5]
    for value in values:
        chunk = {"created": value, "choices": [{"index": value, "delta": {"content": "x"}}]}
        assert _outcome(check_shape, chunk, provider="p") == _outcome(
            reference_check_shape, chunk, provider="p"
        ), value


def _shape_ok(chunk: dict[str, Any]) -> bool:
    try:
        check_shape(chunk, provider="p")
    except GatewayError:
        return False
    return True


@pytest.mark.parametrize("seed", range(4))
def test_accumulator_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        cap = rng.choice([10**9, 200, 40])
        new, old = (
            cls(provider="p", max_answer_bytes=cap) for cls in (StreamAccumulator, ReferenceAccumulator)
        )
        for _ in range(rng.randint(1, 30)):
            chunk = _chunk(rng)
            if not _shape_ok(chunk):
                continue
            # The accumulator writes a missing tool-call index back into the chunk: one copy each.
            a, b = orjson.loads(orjson.dumps(chunk)), orjson.loads(orjson.dumps(chunk))
            got, want = _outcome(new.add, a), _outcome(old.add, b)
            if want[0] == "ok":  # add hands back the chunk's plain_choice, found on the way
                want = ("ok", plain_choice(b))
            assert got == want, chunk
            assert a == b
            if got[0] != "ok":
                break
        assert new.completion() == old.completion()
        assert (new.size, new.chunks, new.usage, new.finished) == (
            old.size,
            old.chunks,
            old.usage,
            old.finished,
        )


def _wire(events: Any) -> list[bytes]:
    return [event.SerializeToString() for event in events]


@pytest.mark.parametrize("seed", range(4))
def test_deltas_same_as_before(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3000):
        batch: list[dict[str, Any] | None] = [
            c for c in (_chunk(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))) if _shape_ok(c)
        ]
        if _maybe(rng, 0.1):
            batch.append(None)
        if not batch:
            continue
        assert _wire(deltas_from_chunks(batch)) == _wire(reference_deltas(batch)), batch


def _redactor(extra: int = 0) -> Redactor:
    redactor = Redactor(SECRETS)
    for n in range(extra):  # many distinct heads: may_touch's general branch
        redactor.add_owned(f"p{n}", f"{string.ascii_letters[n % 52]}{n:03d}-byok-key-{n:08d}")
    return redactor


@pytest.mark.parametrize("path", ["relayed", "events"])
@pytest.mark.parametrize(("seed", "extra"), [(0, 0), (1, 0), (2, 30), (3, 30)])
def test_relayed_same_as_before(seed: int, extra: int, path: str) -> None:
    """Whole streams, secrets split across chunks included: the same events and the same text
    held back at the end, through `relayed` or the three steps it stands for."""
    rng = random.Random(seed)
    redactor = _redactor(extra)
    for _ in range(150):
        want = tool_call_check.Expected(at_most_one=_maybe(rng, 0.2))
        call_secrets = [rng.choice(["", "sk-call-only-key-0000", SECRETS[0]])]
        new, old = AnswerScrubber(redactor, call_secrets), ReferenceScrubber(redactor, call_secrets)
        plain = rng.choice([0.5, 0.9, 1.0])
        for _ in range(rng.randint(1, 40)):
            batch: list[dict[str, Any] | None] = [
                c for c in (_chunk(rng, plain) for _ in range(rng.choice([1, 1, 1, 1, 2]))) if _shape_ok(c)
            ]
            if not batch:
                continue
            if path == "relayed":
                got = _wire(relayed(batch, want, new))
            else:
                got = _wire(new.events(tool_call_check.first_call_only(deltas_from_chunks(batch), want)))
            expected = _wire(old.events(tool_call_check.first_call_only(reference_deltas(batch), want)))
            assert got == expected, batch
            assert new._held == old._held
            assert new._context == old._context
        assert _wire(new.flush()) == _wire(old.flush())


@pytest.mark.parametrize(
    "delta",
    [
        {"reasoning_content": SECRETS[0], "content": "plain text"},
        {
            "content": "plain text",
            "tool_calls": [{"index": 0, "id": "c", "function": {"arguments": SECRETS[1]}}],
        },
        {"content": "plain text " + SECRETS[2]},
        {"content": "plain text sk-"},
    ],
)
def test_a_secret_beside_plain_content_is_scrubbed(delta: dict[str, Any]) -> None:
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    batch: list[dict[str, Any] | None] = [chunk]
    want = tool_call_check.NOTHING
    for events in (
        relayed(batch, want, AnswerScrubber(_redactor())),
        AnswerScrubber(_redactor()).events(deltas_from_chunks(batch)),
    ):
        wire = b"".join(_wire(events))
        assert not any(secret.encode() in wire for secret in SECRETS)
        assert _wire(events) == _wire(ReferenceScrubber(_redactor()).events(reference_deltas(batch)))


def test_relayed_without_a_redactor() -> None:
    rng = random.Random(7)
    want = tool_call_check.NOTHING
    for _ in range(500):
        batch: list[dict[str, Any] | None] = [c for c in [_chunk(rng)] if _shape_ok(c)]
        if batch:
            got = _wire(relayed(batch, want, AnswerScrubber(None)))
            assert got == _wire(reference_deltas(batch))


@pytest.mark.parametrize("extra", [0, 3, 30])
def test_may_touch_is_the_head_test(extra: int) -> None:
    """False exactly when no position begins a spelling's head (with many heads: in a text no
    longer than _WALK_CHARS, else True when a character of it begins one): then
    nothing is held back and nothing is replaced."""
    rng = random.Random(extra)
    redactor = _redactor(extra)
    heads = redactor._heads
    assert (redactor._few_heads is None) == (len([h for h in heads if len(h) == 3]) > _FEW_HEADS)
    for _ in range(5000):
        text = _text(rng) * rng.choice([1, 1, 6]) + rng.choice(["", "x", " ", "s", "sk", "A0"])
        touched = any(text[p : p + 3] in heads for p in range(len(text)))
        if redactor._few_heads is None and len(text) > _WALK_CHARS:
            touched = any(ch in redactor._firsts for ch in text)  # True without a walk
        assert redactor.may_touch(text) == touched, text
        if not touched:
            assert redactor.hold_from(text) == len(text)
            assert redactor.redact_known(text) == text
            assert redactor.known_in(text) == []


def test_may_touch_follows_added_and_dropped_secrets() -> None:
    redactor = Redactor()
    assert not redactor.may_touch("sk-anything at all")
    keys = [f"{c}{c}{c}-owned-key-{n:04d}" for n, c in enumerate(string.ascii_lowercase[:12])]
    for n, key in enumerate(keys):
        redactor.add_owned(f"o{n}", key)
        assert all(redactor.may_touch(f"x {k} y") for k in keys[: n + 1])
        assert (redactor._few_heads is None) == (n + 1 > _FEW_HEADS)
    for n, key in enumerate(keys):
        redactor.discard_owner(f"o{n}")
        assert not redactor.may_touch(f"x {key} y")
        assert all(redactor.may_touch(f"x {k} y") for k in keys[n + 1 :])
        if len(keys) - n - 1 <= _FEW_HEADS:
            assert redactor._few_heads is not None
            assert set(redactor._few_heads) == {k[:3] for k in keys[n + 1 :]}
    assert redactor._few_heads == ()


class _Pieces:
    reader_state = None
    idle_timeout = None

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = list(pieces)

    async def read_chunk(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


class RecordingDecoder(OpenAIStreamDecoder):
    """OpenAI's decoder, keeping every event name and data it was handed."""

    def __init__(self) -> None:
        super().__init__(provider="p", scrub=str)
        self.seen: list[tuple[str | None, bytes]] = []

    def feed(self, event: str | None, data: bytes) -> list[dict[str, Any] | None]:
        self.seen.append((event, data))
        return super().feed(event, data)


async def _batches(parser: _SSEParser) -> list[Any]:
    out: list[Any] = []
    try:
        while batch := await parser.next_batch():
            out.append(batch)
    except GatewayError as exc:
        out.append((type(exc), str(exc)))
    return out


def _event(rng: random.Random) -> bytes:
    data = (
        orjson.dumps(_chunk(rng))
        if _maybe(rng, 0.6)
        else rng.choice(
            [
                orjson.dumps(_chunk(rng)),
                b"[DONE]",
                b" [DONE] ",
                b"not json",
                b"[1]",
                b'{"error": {"message": "boom", "code": 500}}',
                b'{"object": "error", "message": "x"}',
                b"",
            ]
        )
    )
    head = (
        b"data: "
        if _maybe(rng)
        else rng.choice([b"data:", b"event: x\ndata: ", b": keep-alive\ndata: ", b"event: y\n\ndata: "])
    )
    end = b"\n\n" if _maybe(rng) else rng.choice([b"\r\n\r\n", b"\r\r", b"\n", b"\r\n\n"])
    event = head + data + end
    if _maybe(rng, 0.1):  # a lone CR ends a line too
        at = rng.randint(0, len(event))
        event = event[:at] + b"\r" + event[at:]
    return event


@pytest.mark.parametrize("seed", range(4))
async def test_sse_parser_same_as_line_by_line(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(openai_compat, "MAX_EVENT_BYTES", rng.choice([64, 300, 10**6]))
    for _ in range(400):
        body = b"".join(_event(rng) for _ in range(rng.randint(1, 6)))
        if _maybe(rng, 0.1):
            body = b"\xef\xbb\xbf" + body
        # Whole events per read (the fast path's case), or cut anywhere.
        if _maybe(rng):
            pieces = [_event(rng) for _ in range(rng.randint(1, 6))]
        else:
            # Anywhere, or where a `data:` line starts (a read that begins a line but not an event).
            starts = [i for i in range(1, len(body)) if body.startswith(b"data:", i)]
            places = starts if starts and _maybe(rng) else range(1, len(body))
            cuts = sorted(rng.sample(places, min(len(places), rng.randint(0, 8))))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        results = []
        for cls in (_SSEParser, LineParser):
            decoder = RecordingDecoder()
            batches = await _batches(cls(_Pieces(pieces), provider="p", decoder=decoder))  # type: ignore[arg-type]
            results.append((batches, decoder.seen))
        assert results[0] == results[1], pieces


@pytest.mark.parametrize(
    "pieces",
    [
        # An event name read before the data: it goes with the next event only.
        [b"event: x\n", b'data: {"a":1}\n\n', b'data: {"a":2}\n\n'],
        # A line begun in the last read: the piece continues it, it does not start an event.
        [b"da", b'data: {"a":1}\n\n', b'data: {"a":2}\n\n'],
        [b'data: {"a":', b"data: 1}\n\n"],
        # An event ended by CRs, then LFs that may pair with them.
        [b'data: {"a":1}\r\r', b'data: {"a":2}\n\n', b'\ndata: {"a":3}\n\n'],
        [b'data: {"a":1}\r', b'\ndata: {"a":2}\n\n'],
        [b'data: {"a":1}\r\n\r', b'data: {"a":2}\n\n'],
        # The BOM is ignored at the very start only.
        [b'\xef\xbb\xbfdata: {"a":1}\n\n', b'data: {"a":2}\n\n'],
        [b'data: {"a":1}\n\n', b'\xef\xbb\xbfdata: {"a":2}\n\n'],
        [b"data: [DONE]\n\n", b'data: {"a":2}\n\n'],
        [b'data: {"a":1}\n\ndata: {"a":2}\n\n', b'data: {"a":3}\n\n'],
        # Nearly one event: no space after the colon, empty data, a third LF, a single LF.
        [
            b'data:{"a":1}\n\n',
            b"data: \n\n",
            b'data: {"a":2}\n\n\n',
            b'data: {"a":3}\n',
            b'data: {"a":4}\n\n',
        ],
        [b"data:\n\n", b"\n\n", b'data: {"a":1}\n\n'],
    ],
)
async def test_sse_parser_one_event_reads(pieces: list[bytes]) -> None:
    results = []
    for cls in (_SSEParser, LineParser):
        decoder = RecordingDecoder()
        batches = await _batches(cls(_Pieces(pieces), provider="p", decoder=decoder))  # type: ignore[arg-type]
        results.append((batches, decoder.seen))
    assert results[0] == results[1]


# BYOK keys of many providers: more than _FEW_HEADS distinct heads, whose first characters are
# common letters ("s", "g", "x", "p", "r", "h", "n", "c", "t", "f").
_PROVIDER_PREFIXES = ["sk-proj-", "sk-ant-api03-", "gsk_", "xai-", "pplx-", "r8_", "hf_", "nvapi-"]
_PROVIDER_PREFIXES += ["csk-", "tvly-", "fw_", "sk-or-v1-"]


@pytest.mark.parametrize("path", ["relayed", "events"])
def test_a_long_delta_costs_no_python_walk_with_many_heads(path: str) -> None:
    """A 1 MB delta of text with no secret in it, many heads: `may_touch` must not walk it in
    Python (~0.15 us a character, 0.2 s on the loop; as merged). The general path costs ~2.5 ms
    (its Python work is bounded by the longest spelling, its spelling search is C-speed)."""
    redactor = Redactor(SECRETS)
    for n, prefix in enumerate(_PROVIDER_PREFIXES):
        redactor.add_owned(f"p{n}", f"{prefix}{n:04d}-byok-key-0123456789abcdef")
    assert redactor._few_heads is None
    text = "the quick brown fox jumps over the lazy dog, then naps. " * 18_000
    batch: list[dict[str, Any] | None] = [{"choices": [{"index": 0, "delta": {"content": text}}]}]
    want = tool_call_check.NOTHING
    best = float("inf")
    for _ in range(3):
        scrubber = AnswerScrubber(redactor)
        start = time.perf_counter()
        if path == "relayed":
            events = list(relayed(batch, want, scrubber))
        else:
            events = list(scrubber.events(deltas_from_chunks(batch)))
        best = min(best, time.perf_counter() - start)
        assert _wire(events) == _wire(ReferenceScrubber(redactor).events(reference_deltas(batch)))
        assert not scrubber.flush()
    assert best < 0.05, best


# -- OpenAIStreamDecoder's template: a chunk like the last one is built, not parsed ----------

_TEMPLATE_TEXTS = [
    "tok ",
    "",
    'a "quoted" word',
    "back\\slash",
    "tab\there",
    "line\nbreak",
    "\x7f del",
    "é",
    "日本語",
    "emoji 👍🏽 and a joiner 👩\u200d💻",
    "\u2028 separator",
    "\ufeff bom",
    "sk-secret-value-123456789",
    "llmgw-template-probe",
]


def _template_event(rng: random.Random, base: dict[str, Any]) -> bytes:
    """The data of an event, mostly the stream's usual chunk with another text; or bytes that
    look like it but are not (escapes, bad UTF-8, a field changed, a decoy `content`)."""
    text = rng.choice(_TEMPLATE_TEXTS) + rng.choice(["", str(rng.randint(0, 10**6))])
    chunk = orjson.loads(orjson.dumps(base))
    chunk["choices"][0]["delta"] = {"content": text}
    data = orjson.dumps(chunk)
    if _maybe(rng, 0.8):
        return data
    head, _, tail = data.partition(b'"content":"')
    value, _, rest = tail.partition(b'"}')
    variants = [
        head + b'"content":"' + value + b'\xff"}' + rest,  # not UTF-8
        head + b'"content":"}' + rest,  # the template's prefix and suffix, overlapping (one quote)
        head + b'"content":"' + value + b'\xed\xa0\x80"}' + rest,  # a UTF-8 surrogate
        head + b'"content":"' + value + b'\\u00e9"}' + rest,  # an escape
        head + b'"content":"' + value + b'\x01"}' + rest,  # a raw control character
        head + b'"content":"' + value + b'","role":"assistant"}' + rest,  # the delta grows
        head + b'"content":"' + value + b'"}' + rest.replace(b"null", b'"stop"', 1),
        data.replace(b'"m"', b'"n"'),
        data.replace(b"1760000000", b"1760000001"),
        data.replace(b'"content":"', b'"cont\\u0065nt":"'),  # the same key, escaped
        data + b" ",
        b" " + data,
        data[:-1],
        data.replace(b'"id":', b'"error":{"message":"boom"},"id":'),
        data.replace(b'"logprobs":null', b'"logprobs":{"content":"' + value + b'"}'),
        data.replace(b'"logprobs":null', b'"logprobs":null,"content":"x"'),
        b"[DONE]",
        b"{}",
    ]
    return rng.choice(variants)


def _base_chunk(rng: random.Random) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1760000000}
    chunk["model"] = "m"
    if _maybe(rng, 0.3):
        chunk["system_fingerprint"] = rng.choice(["fp", None])
    if _maybe(rng, 0.2):
        chunk["usage"] = rng.choice([None, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}])
    choice: dict[str, Any] = {"index": rng.choice([0, 1]), "delta": {"content": "x"}}
    if _maybe(rng, 0.7):
        choice["logprobs"] = None
    choice["finish_reason"] = rng.choice([None, None, "stop"])
    if _maybe(rng, 0.2):  # an unknown field keeps a stream from having a template: not scalar
        choice["x_extra"] = rng.choice([{"a": 1}, [1], 2])
    chunk["choices"] = [choice]
    return chunk


@pytest.mark.parametrize("seed", range(6))
def test_decoder_template_same_as_parsing(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event decodes as `orjson.loads` + `check_shape` decode it (`_decode_event`), chunk
    or error, whether the template built it or the parser did; and the template does build most."""
    rng = random.Random(seed)
    parsed = 0
    decode = openai_compat._decode_event

    def counted(data: bytes, provider: str, scrub: Any) -> dict[str, Any] | None:
        nonlocal parsed
        parsed += 1
        return decode(data, provider, scrub)

    monkeypatch.setattr(openai_compat, "_decode_event", counted)
    events = 0
    for _ in range(150):
        base = _base_chunk(rng)
        decoder = OpenAIStreamDecoder(provider="p", scrub=str)
        if _maybe(rng, 0.3):  # a decoder that learnt other streams' chunks first
            for _ in range(rng.randint(1, 3)):
                decoder.feed(None, orjson.dumps(_base_chunk(rng)))
        out = []
        for _ in range(rng.randint(1, 40)):
            data = _template_event(rng, base)
            got = _outcome(decoder.feed, None, data)
            want = _outcome(lambda d: [decode(d, "p", str)], data)
            assert got == want, data
            if got[0] == "ok":
                out.extend(got[1])
            events += 1
        # Every chunk handed out is its own object: changing one changes no other.
        for chunk in out:
            if chunk is not None:
                chunk["id"] = "changed"
                for choice in chunk.get("choices") or ():
                    if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                        choice["delta"]["content"] = "changed"
        assert len({id(c) for c in out if c is not None}) == len([c for c in out if c is not None])
        assert _outcome(decoder.feed, None, data) == _outcome(lambda d: [decode(d, "p", str)], data)
    assert events - parsed > events * 0.1, (parsed, events)


def test_decoder_template_builds_a_paced_stream() -> None:
    """The bench's paced stream (a role chunk, text chunks, a finish, usage): two parses for its
    text chunks (the first one learns), the rest built; the same chunks either way."""
    parsed = 0
    decode = openai_compat._decode_event

    def counted(data: bytes, provider: str, scrub: Any) -> dict[str, Any] | None:
        nonlocal parsed
        parsed += 1
        return decode(data, provider, scrub)

    base = b'{"id":"c1","object":"chat.completion.chunk","created":1760000000,"model":"m","choices":'
    events = [base + b'[{"index":0,"delta":{"role":"assistant","content":"tok0 "},"finish_reason":null}]}']
    events += [
        base + b'[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}' % i for i in range(1, 99)
    ]
    events += [base + b'[{"index":0,"delta":{"content":"tok99 "},"finish_reason":"stop"}]}']
    events += [base + b'[],"usage":{"prompt_tokens":1,"completion_tokens":99,"total_tokens":100}}', b"[DONE]"]
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openai_compat, "_decode_event", counted)
        got = [decoder.feed(None, data) for data in events]
    assert got == [[decode(data, "p", str)] for data in events]
    assert parsed == 5  # the role chunk, the first text chunk, the finish, usage, [DONE]


def test_decoder_template_not_taken_from_a_decoy() -> None:
    """An event whose first `"content":"` is not the delta's (the delta's key escaped, the text
    repeated elsewhere) gives no template: the next event's text goes where the parser puts it."""
    first = (
        b'{"id":"c","choices":[{"index":0,"delta":{"cont\\u0065nt":"ab"},"x":"y"}],'
        b'"model":"m","content":"ab"}'
    )
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    assert decoder.feed(None, first) == [orjson.loads(first)]
    second = first.replace(b'"content":"ab"', b'"content":"zz"')
    assert decoder.feed(None, second) == [orjson.loads(second)]
    assert decoder.feed(None, second)[0]["choices"][0]["delta"] == {"content": "ab"}


def test_decoder_template_bounds() -> None:
    """A chunk over _TEMPLATE_BYTES besides its text is no template; a stream learns at most
    _TEMPLATE_LEARNS times (each costs one parse more), however its chunks change."""
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    big = {"id": "c" * (openai_compat._TEMPLATE_BYTES + 1), "choices": [{"delta": {"content": "a"}}]}
    decoder.feed(None, orjson.dumps(big))
    assert decoder._prefix == b"" and decoder._learns == openai_compat._TEMPLATE_LEARNS
    for n in range(3 * openai_compat._TEMPLATE_LEARNS):
        data = orjson.dumps({"id": f"c{n}", "choices": [{"delta": {"content": "a"}}]})
        assert decoder.feed(None, data) == [orjson.loads(data)]
    assert decoder._learns == 0
    last = openai_compat._TEMPLATE_LEARNS - 1  # every chunk missed the one before's template
    assert decoder._prefix == b'{"id":"c%d","choices":[{"delta":{"content":"' % last


class _CountedScalars(tuple[type, ...]):
    """`_SCALARS`, counting the look-ups: each field a learning attempt checks is one."""

    looked = 0

    def __contains__(self, item: object) -> bool:
        type(self).looked += 1
        return tuple.__contains__(self, item)


@pytest.mark.parametrize(
    "shape",
    [
        # Azure's content filter (and logprobs): a field that is not a scalar, in every chunk.
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"w%d "},"content_filter_results":{}}]}',
        # Text the upstream writes with escapes it need not use (ensure_ascii, Go's HTML-safe <>&).
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"\\u00e9%d\\u003c"}}]}',
    ],
)
def test_a_stream_that_never_fits_stops_trying(shape: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks that can never be a template each missed, so each tried to learn again, at about
    the cost of the parse (callgrind: ~20k instructions more per 250-byte chunk, the decoder's
    work doubled) for every chunk of such a stream. Every attempt past the cheap look at the
    delta counts against _TEMPLATE_LEARNS; the chunks are the parser's all the same."""
    monkeypatch.setattr(openai_compat, "_SCALARS", _CountedScalars(openai_compat._SCALARS))
    _CountedScalars.looked = 0
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    for n in range(200):
        data = shape % n
        assert decoder.feed(None, data) == [orjson.loads(data)]
    # Each attempt looks at the chunk's id, the choice's index and at most one field more.
    assert _CountedScalars.looked <= 4 * openai_compat._TEMPLATE_LEARNS, _CountedScalars.looked
    assert decoder._learns == 0 and decoder._prefix == b""


def test_text_with_escapes_spends_no_learning() -> None:
    """A text JSON must escape (a quote, a backslash, a newline) is skipped before any work: a
    stream whose first text chunks have one still learns its template from the next."""
    decoder = OpenAIStreamDecoder(provider="p", scrub=str)
    head = b'{"id":"c","choices":[{"index":0,"delta":{"content":"'
    for text in [b"a\\nb", b'\\"q\\"', b"x\\\\y"] * 3:
        data = head + text + b'"}}]}'
        assert decoder.feed(None, data) == [orjson.loads(data)]
    assert decoder._learns == openai_compat._TEMPLATE_LEARNS
    data = head + b'plain"}}]}'
    assert decoder.feed(None, data) == [orjson.loads(data)]
    assert decoder._prefix == head
    assert decoder.feed(None, head + b'next"}}]}') == [orjson.loads(head + b'next"}}]}')]


@pytest.mark.parametrize("seed", range(3))
def test_plain_wire_is_the_plain_event_serialized(seed: int) -> None:
    """The usual delta's bytes, built without a message, are the serialized event; any other
    plain choice (an index, a finish reason, 126 bytes or more) is the event itself."""
    rng = random.Random(seed)
    texts = [*_TEMPLATE_TEXTS, "x" * 123, "x" * 124, "x" * 125, "x" * 126, "é" * 62, "é" * 63, "日" * 200]
    for _ in range(2000):
        choice: dict[str, Any] = {}
        if _maybe(rng):
            choice["index"] = rng.choice([0, 0, 1, 2, None])
        if _maybe(rng):
            choice["finish_reason"] = rng.choice([None, None, "", "stop", "length", "weird"])
        content = rng.choice(texts) + rng.choice(["", _text(rng)])
        if not content:
            continue
        choice["delta"] = {"content": content}
        event = plain_event(choice, content)
        got = plain_wire(choice, content)
        if type(got) is bytes:
            assert got == event.SerializeToString()
            assert not choice.get("index") and not choice.get("finish_reason")
            assert chat_pb2.StreamCreateResponse.FromString(got) == event
        else:
            assert got == event
            assert choice.get("index") or choice.get("finish_reason") or len(content.encode()) >= 126
    # A lone surrogate: the message refuses it, as before (not an encoding error of our own).
    with pytest.raises(Exception) as raised:  # noqa: PT011 - whichever the message raises
        plain_event({}, "a\ud800")
    with pytest.raises(raised.type):
        plain_wire({}, "a\ud800")


def test_the_serializer_sends_bytes_as_they_are() -> None:
    event = plain_event({}, "tok ")
    serialize = server_stream(lambda data, context: None).response_serializer  # type: ignore[arg-type,return-value]
    assert serialize(event) == event.SerializeToString()
    assert serialize(b"\x0a\x06\x12\x04tok ") == event.SerializeToString()
