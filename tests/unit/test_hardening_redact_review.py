"""Review of issue 12 items 5 and 13 (redaction, keys echoed in answers): attacks on the stream
scrubber that let a known key out, each fixed in `server/core/answer_scrub.py`."""

from __future__ import annotations

import gc
import json

from llmgateway.v1 import chat_pb2

from server.auth.redact import REDACTED, Redactor
from server.core.answer_scrub import AnswerScrubber

KEY = "sk-proj-" + "Q7" * 10 + "w9" * 10
LONGER = KEY + "XYZxyz0123456789"  # a second known key that starts with the first


def _delta(**fields: object) -> chat_pb2.StreamCreateResponse:
    calls = fields.pop("calls", ())
    event = chat_pb2.StreamCreateResponse(delta=chat_pb2.ChatCompletionDelta(**fields))  # type: ignore[arg-type]
    for call in calls:  # type: ignore[attr-defined]
        event.delta.tool_calls.add(**call)
    return event


def _stream(
    scrubber: AnswerScrubber, events: list[chat_pb2.StreamCreateResponse]
) -> dict[tuple[object, ...], str]:
    """Everything the client got, concatenated per field (choice, channel, tool-call index)."""
    sent: list[chat_pb2.StreamCreateResponse] = []
    for event in events:
        sent += scrubber.events([event])
    sent += scrubber.flush()
    texts: dict[tuple[object, ...], str] = {}

    def add(key: tuple[object, ...], text: str) -> None:
        texts[key] = texts.get(key, "") + text

    for event in sent:
        delta = event.delta
        add((delta.index, "content"), delta.content)
        add((delta.index, "reasoning"), delta.reasoning_content)
        for fragment in delta.tool_calls:
            add((delta.index, "arguments", fragment.index), fragment.arguments)
            add((delta.index, "name", fragment.index), fragment.name)
            add((delta.index, "id", fragment.index), fragment.id)
    return texts


def _leaks(texts: dict[tuple[object, ...], str], secret: str) -> dict[tuple[object, ...], str]:
    # The secret, or a 16-character piece of it past its public "sk-proj-" start.
    pieces = [secret[i : i + 16] for i in range(8, len(secret) - 15)]
    return {k: v for k, v in texts.items() if any(p in v for p in pieces)}


def test_a_key_that_starts_another_known_key_is_not_cut_at_a_delta_boundary() -> None:
    # The colleague's admitted leak: the delta ends with KEY exactly, the next carries the rest of
    # LONGER; KEY was replaced on its own and the rest of LONGER went out.
    scrubber = AnswerScrubber(Redactor([KEY, LONGER]))
    texts = _stream(
        scrubber,
        [_delta(content="x " + KEY), _delta(content=LONGER[len(KEY) :] + " y"), _delta(finish_reason=1)],
    )
    assert texts[(0, "content")] == f"x {REDACTED} y"


def test_the_shorter_key_alone_is_still_replaced_when_the_longer_does_not_follow() -> None:
    scrubber = AnswerScrubber(Redactor([KEY, LONGER]))
    texts = _stream(scrubber, [_delta(content="x " + KEY), _delta(content=" y"), _delta(finish_reason=1)])
    assert texts[(0, "content")] == f"x {REDACTED} y"
    texts = _stream(AnswerScrubber(Redactor([KEY, LONGER])), [_delta(content="x " + KEY)])
    assert texts[(0, "content")] == f"x {REDACTED}"  # held whole, released scrubbed at the end


def test_tool_call_index_switching_mid_secret() -> None:
    # Call 0 stops halfway through the key, call 1 starts, call 0 goes on: the held half of
    # call 0 was released when call 1 started, and the rest followed.
    scrubber = AnswerScrubber(Redactor([KEY]))
    texts = _stream(
        scrubber,
        [
            _delta(calls=[{"index": 0, "id": "c0", "name": "f", "arguments": '{"a": "' + KEY[:15]}]),
            _delta(calls=[{"index": 1, "id": "c1", "name": "g", "arguments": "{}"}]),
            _delta(calls=[{"index": 0, "arguments": KEY[15:] + '"}'}]),
            _delta(finish_reason=chat_pb2.FINISH_REASON_TOOL_CALLS),
        ],
    )
    assert not _leaks(texts, KEY)
    assert json.loads(texts[(0, "arguments", 0)]) == {"a": REDACTED}
    assert json.loads(texts[(0, "arguments", 1)]) == {}


def test_tool_call_name_and_id_split_over_fragments() -> None:
    for field in ("name", "id"):
        scrubber = AnswerScrubber(Redactor([KEY]))
        other = "id" if field == "name" else "name"
        for split in (3, 15):
            scrubber = AnswerScrubber(Redactor([KEY]))
            texts = _stream(
                scrubber,
                [
                    _delta(calls=[{"index": 0, other: "x", field: "f_" + KEY[:split]}]),
                    _delta(calls=[{"index": 0, field: KEY[split:]}]),
                    _delta(calls=[{"index": 0, "arguments": "{}"}]),
                    _delta(finish_reason=chat_pb2.FINISH_REASON_TOOL_CALLS),
                ],
            )
            assert not _leaks(texts, KEY), (field, split, texts)


def test_a_name_is_never_cut_by_the_scrubber() -> None:
    # "tools" ends with "s", a head of "sk-...": the name still goes out whole, at once.
    scrubber = AnswerScrubber(Redactor([KEY]))
    sent = list(scrubber.events([_delta(calls=[{"index": 0, "id": "call_s", "name": "tools"}])]))
    assert [(f.id, f.name) for f in sent[0].delta.tool_calls] == [("call_s", "tools")]


def test_text_after_a_choice_finished_does_not_complete_a_held_secret() -> None:
    scrubber = AnswerScrubber(Redactor([KEY]))
    texts = _stream(scrubber, [_delta(content=KEY[:15], finish_reason=1), _delta(content=KEY[15:] + " ok")])
    assert KEY[15:] not in texts[(0, "content")]
    assert texts[(0, "content")].endswith(f"{REDACTED} ok")


def test_a_call_key_evicted_from_the_shared_redactor_mid_call_stays_known() -> None:
    # 20,001 BYOK providers (or the provider's key replaced or deleted) while a call runs: the LRU
    # dropped this call's key, and the rest of the answer and the trace were scrubbed without it.
    # The call's target holds a lease on its key (server.app's BYOK lookup makes it).
    redactor = Redactor(max_secrets=2)
    redactor.add_owned("byok\x00org\x00mine", KEY)
    lease = redactor.lease(KEY)
    scrubber = AnswerScrubber(redactor, [KEY])
    redactor.add_owned("byok\x00org\x00a", "a" * 40)
    redactor.add_owned("byok\x00org\x00b", "b" * 40)
    redactor.discard_owner("byok\x00org\x00mine")
    assert redactor.redact_known(f"echo {KEY}") == f"echo {REDACTED}"  # the trace's scrub
    texts = _stream(scrubber, [_delta(content=KEY[:20]), _delta(content=KEY[20:]), _delta(finish_reason=1)])
    assert texts[(0, "content")] == REDACTED
    del lease
    gc.collect()
    assert KEY not in redactor  # dropped once the call is over: the bound holds


async def test_the_byok_target_carries_the_lease() -> None:
    import tempfile
    from pathlib import Path

    from server.auth.actor import Actor
    from server.auth.endpoints import EndpointPolicy
    from server.core.keys import ByokProvider, resolve_target
    from tests.gateway_harness import make_settings

    settings = make_settings(Path(tempfile.mkdtemp()), allowed_endpoints=("http://127.0.0.1:9/v1",))
    redactor = Redactor()
    keep = redactor.lease(KEY)

    async def lookup(organization_id: str, name: str) -> ByokProvider:
        return ByokProvider(name, "http://127.0.0.1:9/v1", KEY, keep=keep)

    async def urls(organization_id: str) -> list[str]:
        return ["http://127.0.0.1:9/v1"]

    config = chat_pb2.LLMConfig(
        model="m", provider_name="mine", provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK
    )
    target = await resolve_target(
        config,
        settings=settings,
        actor=Actor(organization_id="org", user_id="", is_admin=True),
        policy=EndpointPolicy.from_settings(settings),
        byok_provider=lookup,
        byok_urls=urls,
    )
    assert target.keep is keep


def test_a_key_echoed_by_common_json_encoders_is_redacted() -> None:
    # Go's encoding/json escapes <, > and & (\u003c...), PHP's json_encode escapes "/" ("\/"):
    # a debugging proxy written in either echoes a key with those characters in that spelling.
    secret = "AbC/dEf+gHi&jKl<mNo>pQr/sTu=vWx0123456789yZ"
    redactor = Redactor([secret])
    go = secret.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    php = secret.replace("/", "\\/")
    both = go.replace("/", "\\/")
    for spelling in (go, php, both):
        assert redactor.redact_known(f'{{"auth": "{spelling}"}}') == f'{{"auth": "{REDACTED}"}}', spelling
        assert json.loads(f'"{spelling}"') == secret  # what a client parsing the arguments gets


def test_log_extra_fields_are_redacted() -> None:
    # A structured (JSON, OpenTelemetry) handler shows `extra=` fields: an upstream's tool call
    # named after a key reaches them (core/inner_thoughts.py logs `function_name`).
    import logging

    from server.auth.redact import install_log_redaction, uninstall_log_redaction

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.redact.review")
    handler = Keep()
    logger.addHandler(handler)
    install_log_redaction(Redactor([KEY]))
    try:
        logger.warning("call %s", KEY, extra={"function_name": KEY, "fields": {"name": KEY}, "n": 3})
    finally:
        uninstall_log_redaction()
        logger.removeHandler(handler)
    (record,) = records
    assert record.getMessage() == f"call {REDACTED}"
    assert record.function_name == REDACTED  # type: ignore[attr-defined]
    assert record.fields == {"name": REDACTED}  # type: ignore[attr-defined]
    assert record.n == 3  # type: ignore[attr-defined]


def test_a_stream_split_anywhere_lets_out_exactly_what_a_completion_would() -> None:
    # Random known keys (8 to 73 characters, some starting others), random text around them
    # (unicode included), random cuts: the deltas joined equal the unary scrub of the whole text.
    # (The merged code differed in ~19% of these cases, each time letting out part of a key.)
    import random
    import string

    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + "-_"
    for _ in range(600):
        keys: list[str] = []
        for _ in range(rng.randint(1, 4)):
            if keys and rng.random() < 0.4:
                keys.append(rng.choice(keys) + "".join(rng.choices(alphabet, k=rng.randint(1, 20))))
            else:
                keys.append(
                    "".join(rng.choices(alphabet, k=rng.choice([8, 9, 14, 15, 22, 23, 38, 39, 51, 73])))
                )
        redactor = Redactor(keys)
        text = "".join(
            rng.choice(["é ", "日本 ", "x", " ", "\U0001f600", "s", "ab"]) + rng.choice(keys)
            for _ in range(rng.randint(1, 5))
        )
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        texts = _stream(AnswerScrubber(redactor), [_delta(content=piece) for piece in pieces])
        assert texts[(0, "content")] == redactor.redact_known(text), (keys, pieces)
