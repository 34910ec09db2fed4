"""The request path's shortcuts give the answers of the full checks they skip (issue 20)."""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2, traces_pb2

from server.api.context import parse
from server.core import validation
from server.errors import InvalidRequest


def _trace_fields(request: chat_pb2.CreateRequest) -> list[str]:
    return [v.field for v in validation._trace_violations(request)]


@pytest.mark.parametrize(
    ("trace", "user_id", "fields"),
    [
        (chat_pb2.TraceContext(step_id="s" * 256), "", []),
        (chat_pb2.TraceContext(step_id="s" * 257), "", ["trace.step_id"]),
        # Multi-byte: 200 characters in 400 bytes are within the bound (the byte fast path
        # does not decide it; the full check does), 257 characters are not.
        (chat_pb2.TraceContext(agent_id="é" * 200, run_id="ü" * 200), "", []),
        (chat_pb2.TraceContext(run_id="é" * 257), "", ["trace.run_id"]),
        (chat_pb2.TraceContext(tags=["t"] * 256), "", []),
        (chat_pb2.TraceContext(tags=["t"] * 257), "", ["trace.tags"]),
        (chat_pb2.TraceContext(tags=["ok", "t" * 257]), "", ["trace.tags[1]"]),
        (chat_pb2.TraceContext(step_id="s" * 40, call_type="c" * 40), "u" * 256, []),
        (chat_pb2.TraceContext(step_id="s" * 40), "u" * 257, ["user_id"]),
        (chat_pb2.TraceContext(), "", []),
    ],
)
def test_trace_bounds_with_and_without_the_byte_shortcut(
    trace: chat_pb2.TraceContext, user_id: str, fields: list[str]
) -> None:
    request = chat_pb2.CreateRequest(trace=trace, user_id=user_id)
    assert _trace_fields(request) == fields


def _functions(count: int, properties: int) -> list[chat_pb2.FunctionDefinition]:
    out = []
    for f in range(count):
        parameters = struct_pb2.Struct()
        parameters.update(
            {
                "type": "object",
                "properties": {
                    f"p{p}": {"type": "string", "description": "x" * 40} for p in range(properties)
                },
            }
        )
        out.append(chat_pb2.FunctionDefinition(name=f"f{f}", description="d" * 50, parameters=parameters))
    return out


def test_a_normal_function_set_is_keyed_whole_without_awaiting() -> None:
    functions = _functions(20, 5)
    assert validation.function_keys_started(functions) == list(validation.function_keys(functions))
    assert validation.function_keys_started([]) == []


async def test_a_huge_function_set_is_serialized_once_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    functions = _functions(300, 10)
    keys = validation.function_keys(functions)
    assert validation.off_loop(keys)
    on_loop: list[int] = []
    loop_thread = threading.get_ident()
    original = validation._serialized

    def spy(function: Any) -> bytes:
        if threading.get_ident() == loop_thread:
            on_loop.append(1)
        return original(function)

    monkeypatch.setattr(validation, "_serialized", spy)
    started = validation.function_keys_started(functions)
    assert 0 < len(started) < len(functions)
    assert await validation.function_keys_rest(functions, started) == keys
    assert len(on_loop) == len(started)  # the rest went to the pool, nothing twice


def test_parse_without_timestamps_decodes_and_with_them_still_checks() -> None:
    request = chat_pb2.CreateRequest(llm_config=chat_pb2.LLMConfig(model="m"))
    assert parse(chat_pb2.CreateRequest, request.SerializeToString()) == request
    bad = traces_pb2.ListProviderTracesRequest()
    bad.start_time.seconds = -62_135_596_801  # before year 1
    with pytest.raises(InvalidRequest, match="start_time"):
        parse(traces_pb2.ListProviderTracesRequest, bad.SerializeToString())
    good = traces_pb2.ListProviderTracesRequest()
    good.start_time.seconds = 1_700_000_000
    assert parse(traces_pb2.ListProviderTracesRequest, good.SerializeToString()) == good


def test_parse_names_the_message_type_of_undecodable_bytes() -> None:
    # The type's name is read only on this path (not on every call).
    with pytest.raises(InvalidRequest, match="not a valid llmgateway.v1.CreateRequest") as raised:
        parse(chat_pb2.CreateRequest, b"\xff\xff\xff")
    assert raised.value.metadata == {"message_type": "llmgateway.v1.CreateRequest", "bytes": "3"}


def _fields(request: chat_pb2.CreateRequest) -> list[str]:
    try:
        validation.validate_request(request)
    except InvalidRequest as exc:
        return [v.field for v in exc.field_violations]
    return []


def _request(config: chat_pb2.LLMConfig, **fields: Any) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=config, messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")], **fields
    )


def test_config_checks_are_cached_per_config_and_stay_in_order() -> None:
    validation._CONFIG_CHECKS.clear()
    good = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", model_endpoint="https://a.example/v1")
    hot = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", temperature=3.0, top_p=2.0)
    for _ in range(2):  # computed, then cached: the same answers
        assert _fields(_request(good)) == []
        assert _fields(_request(hot)) == ["llm_config.temperature", "llm_config.top_p"]
    assert len(validation._CONFIG_CHECKS) == 2
    # The model's problem before the trace's, the trace's before the other config fields'.
    bad = chat_pb2.LLMConfig(model="", model_endpoint_type="nope", context_window=-1)
    request = _request(bad, trace=chat_pb2.TraceContext(step_id="s" * 257))
    for _ in range(2):
        assert _fields(request) == [
            "llm_config.model",
            "trace.step_id",
            "llm_config.model_endpoint_type",
            "llm_config.context_window",
        ]
    thoughts = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", put_inner_thoughts_in_kwargs=True)
    clash = chat_pb2.FunctionDefinition(name="f")
    clash.parameters.update({"type": "object", "properties": {"thinking": {"type": "string"}}})
    for _ in range(2):
        assert _fields(_request(thoughts, functions=[clash])) == [
            "functions[0].parameters.properties.thinking"
        ]
        assert _fields(_request(good, functions=[clash])) == []


def test_the_config_cache_is_bounded_in_entries_and_in_key_size() -> None:
    validation._CONFIG_CHECKS.clear()
    for n in range(validation._CONFIG_CHECKS._max + 10):
        config = chat_pb2.LLMConfig(model=f"m{n}", model_endpoint_type="openai", context_window=n)
        assert _fields(_request(config)) == []
        assert len(validation._CONFIG_CHECKS) <= validation._CONFIG_CHECKS._max
    validation._CONFIG_CHECKS.clear()
    huge = chat_pb2.LLMConfig(model="m" * 2000, model_endpoint_type="openai", handle="h" * 70_000)
    assert huge.ByteSize() > validation.MAX_CACHED_CONFIG_BYTES
    # over MAX_MODEL_CHARS and MAX_CONFIG_NAME_CHARS
    assert _fields(_request(huge)) == ["llm_config.model", "llm_config.handle"]
    assert _fields(_request(huge)) == ["llm_config.model", "llm_config.handle"]
    assert len(validation._CONFIG_CHECKS) == 0


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        (chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", handle="h" * 1024), []),
        (
            chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", handle="h" * 1025),
            ["llm_config.handle"],
        ),
        (
            chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", provider_name="p" * 5000),
            ["llm_config.provider_name"],
        ),
        (
            chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", model_wrapper="w" * 1025),
            ["llm_config.model_wrapper"],
        ),
        (
            chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", reasoning_effort="e" * 1025),
            ["llm_config.reasoning_effort"],
        ),
        (
            chat_pb2.LLMConfig(
                model="m", model_endpoint_type="openai", model_endpoint="https://x.example/" + "v" * 8200
            ),
            ["llm_config.model_endpoint"],
        ),
    ],
)
def test_the_configs_names_and_endpoint_are_bounded(config: chat_pb2.LLMConfig, fields: list[str]) -> None:
    for _ in range(2):  # the cached answer is the same
        assert _fields(_request(config)) == fields


def test_a_config_over_a_mebibyte_is_refused_without_reading_its_fields() -> None:
    """A caller's 50 MB field (or unknown field) was serialized two or three times per call on
    the event loop (the caches' keys, the trace's copy), ~100 ms each: refused at the first."""
    config = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai")
    # Field 1000, length-delimited: unknown to LLMConfig, kept by the parser and serialized again.
    size = 2 * 1024 * 1024
    wire = config.SerializeToString() + _varint(1000 << 3 | 2) + _varint(size) + b"u" * size
    big = chat_pb2.LLMConfig.FromString(wire)
    assert big.ByteSize() > validation.MAX_CONFIG_BYTES
    assert _fields(_request(big)) == ["llm_config"]
    huge_name = chat_pb2.LLMConfig(model="m", model_endpoint_type="openai", handle="h" * (2 * 1024 * 1024))
    assert _fields(_request(huge_name)) == ["llm_config"]
    assert len(validation._CONFIG_CHECKS) <= validation._CONFIG_CHECKS._max


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_deadline_of_equals_deadline_after_with_or_without_a_deadline() -> None:
    import time

    from server.api.context import deadline_of
    from server.core.retry import Deadline

    class _Ctx:
        def __init__(self, remaining: float | None) -> None:
            self.remaining = remaining

        def time_remaining(self) -> float | None:
            return self.remaining

    for remaining in (None, 10.0**9, 10**8 + 1):  # none, and grpc's "infinite"
        deadline = deadline_of(cast(Any, _Ctx(remaining)))
        assert deadline == Deadline.after(None) and deadline.at is None and deadline.remaining() is None
    before = time.monotonic()
    for remaining in (5.0, 10.0**8, 0.0, -1.0):
        at = deadline_of(cast(Any, _Ctx(remaining))).at
        assert at is not None and before + remaining <= at <= time.monotonic() + remaining
