"""Issue 12, item 13: `AnswerScrubber` keeps known keys out of answers, a stream's included,
across chunk boundaries, holding back no more than it must (behaviour, not timings)."""

from __future__ import annotations

import json
import random
import string

import pytest
from llmgateway.v1 import chat_pb2

from server.auth.redact import REDACTED, Redactor
from server.core.answer_scrub import AnswerScrubber

RNG = random.Random(7)
ALPHABET = string.ascii_letters + string.digits + "-_"


def _key(length: int, prefix: str = "") -> str:
    return prefix + "".join(RNG.choices(ALPHABET, k=length - len(prefix)))


def _content_events(pieces: list[str], finish: bool = True) -> list[chat_pb2.StreamCreateResponse]:
    events = [chat_pb2.StreamCreateResponse(delta=chat_pb2.ChatCompletionDelta(content=p)) for p in pieces]
    if finish:
        events.append(
            chat_pb2.StreamCreateResponse(
                delta=chat_pb2.ChatCompletionDelta(finish_reason=chat_pb2.FINISH_REASON_STOP)
            )
        )
    return events


def _run(scrubber: AnswerScrubber, events: list[chat_pb2.StreamCreateResponse]) -> list[str]:
    """What each incoming event let out (one list entry per event), then what the flush let out."""
    out = []
    for event in events:
        sent = list(scrubber.events([event]))
        out.append("".join(e.delta.content for e in sent))
    out.append("".join(e.delta.content for e in scrubber.flush()))
    return out


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8, 13])
def test_a_secret_split_over_deltas_never_goes_out(split: int) -> None:
    secret = _key(51, "sk-")
    redactor = Redactor([secret, _key(40)])
    text = f"you sent Bearer {secret} ok, and {secret}"
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    out = _run(AnswerScrubber(redactor), _content_events(pieces))
    assert "".join(out) == f"you sent Bearer {REDACTED} ok, and {REDACTED}"
    # Nothing of the secret went out on its own: no emitted piece ends with a prefix of it that
    # the next piece continues.
    sent = "".join(out)
    assert secret[:4] not in sent


def test_normal_text_is_not_held_and_a_false_start_is_released_at_once() -> None:
    secret = _key(40, "sk-")
    scrubber = AnswerScrubber(Redactor([secret]))

    def send(piece: str) -> str:
        return "".join(e.delta.content for e in scrubber.events(_content_events([piece], finish=False)))

    assert [send("Hello "), send("world"), send("! ")] == ["Hello ", "world", "! "]
    # "task" ends with "sk": held back (it could be the start of the key) ...
    assert send("a task") == "a ta"
    # ... and released with the next delta that shows it is not.
    assert send(" done") == "sk done"
    assert scrubber.flush() == []


def test_hold_back_is_bounded_by_the_longest_secret() -> None:
    secret = "Z" * 60 + "!"
    redactor = Redactor([secret])
    scrubber = AnswerScrubber(redactor)
    emitted = _run(scrubber, _content_events(["Z"] * 200, finish=False))
    held = 200 - len("".join(emitted[:-1]))
    assert 0 < held <= len(secret) - 1
    assert "".join(emitted) == "Z" * 200  # the flush releases the rest


def test_tool_call_arguments_across_fragments_and_calls() -> None:
    secret = _key(45)
    scrubber = AnswerScrubber(None, call_secrets=[secret])  # the key sent on this call only
    args0 = json.dumps({"message": f"key {secret}"})
    args1 = json.dumps({"message": "second"})
    events = [
        chat_pb2.StreamCreateResponse(
            delta=chat_pb2.ChatCompletionDelta(
                tool_calls=[chat_pb2.ToolCallDelta(index=0, id="c0", name="send")]
            )
        )
    ]
    events += [
        chat_pb2.StreamCreateResponse(
            delta=chat_pb2.ChatCompletionDelta(tool_calls=[chat_pb2.ToolCallDelta(index=0, arguments=c)])
        )
        for c in args0
    ]
    events.append(
        chat_pb2.StreamCreateResponse(
            delta=chat_pb2.ChatCompletionDelta(
                tool_calls=[chat_pb2.ToolCallDelta(index=1, id="c1", name="send", arguments=args1)]
            )
        )
    )
    events.append(
        chat_pb2.StreamCreateResponse(
            delta=chat_pb2.ChatCompletionDelta(finish_reason=chat_pb2.FINISH_REASON_TOOL_CALLS)
        )
    )
    sent = list(scrubber.events(events)) + scrubber.flush()
    calls: dict[int, str] = {}
    order = []
    for event in sent:
        for fragment in event.delta.tool_calls:
            calls[fragment.index] = calls.get(fragment.index, "") + fragment.arguments
            order.append(fragment.index)
    assert json.loads(calls[0]) == {"message": f"key {REDACTED}"}
    assert json.loads(calls[1]) == {"message": "second"}
    assert order.index(1) > max(i for i, v in enumerate(order) if v == 0)  # call 0 ends before call 1
    assert sent[-1].delta.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS


def test_completion_fields_scrubbed() -> None:
    secret = _key(40)
    completion = chat_pb2.ChatCompletion(id=secret, model=f"m {secret}")
    message = completion.choices.add().message
    message.content = f"c {secret}"
    message.reasoning_content = secret
    message.tool_calls.add(id="x", name=secret, arguments=json.dumps({"a": secret}))
    AnswerScrubber(Redactor([secret])).completion(completion)
    assert secret not in str(completion)
    assert completion.model == f"m {REDACTED}" and json.loads(message.tool_calls[0].arguments) == {
        "a": REDACTED
    }


def test_answers_keep_key_shaped_text_that_is_no_known_secret() -> None:
    # Patterns are for traces and logs; a model may write an example key in an answer.
    scrubber = AnswerScrubber(Redactor(["a-known-secret-value"]))
    example = 'client = OpenAI(api_key="sk-abcdefghijklmnopqrstuvwxyz0123")'
    assert scrubber.text(example) == example


def test_refusal_and_thinking_text_of_a_completion_are_scrubbed() -> None:
    secret = _key(51, "sk-ant-")
    completion = chat_pb2.ChatCompletion()
    message = completion.choices.add().message
    message.refusal = f"I will not use {secret}"
    message.thinking_blocks.add(type="thinking", text=f"the key is {secret}", signature="EqQBCgIYAh")
    AnswerScrubber(Redactor([secret])).completion(completion)
    assert secret not in message.refusal and REDACTED in message.refusal
    assert secret not in message.thinking_blocks[0].text
    assert message.thinking_blocks[0].signature == "EqQBCgIYAh"  # opaque: sent back unchanged
