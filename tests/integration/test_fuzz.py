"""Property: whatever arrives at any RPC, the answer is a clean status and the server stays up.

Random bytes and random well-formed but nonsensical messages go to every RPC of every service
through a real in-process server (and a fake upstream behind it, so requests that pass
validation exercise the whole request path). Every failure must be a status from the
contract's table with exactly one ErrorInfo, never UNKNOWN or INTERNAL, and health stays
SERVING.

The server is created inside each test (its own event loop), so hypothesis drives plain
synchronous examples and no function-scoped fixture is reused across them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, struct_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

from tests.fake_upstream import FakeUpstream, Reply, completion, text_stream
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_errors_support import CHAT, PROVIDERS, TRACES, assert_serving, call_raw, details

MAX_EXAMPLES = 150
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}

REQUEST_TYPES: dict[str, type[Message]] = {
    CHAT + "Create": chat_pb2.CreateRequest,
    CHAT + "StreamCreate": chat_pb2.StreamCreateRequest,
    CHAT + "CountTokens": chat_pb2.CountTokensRequest,
    TRACES + "GetProviderTrace": traces_pb2.GetProviderTraceRequest,
    TRACES + "ListProviderTraces": traces_pb2.ListProviderTracesRequest,
    PROVIDERS + "CreateProvider": providers_pb2.CreateProviderRequest,
    PROVIDERS + "ListProviders": providers_pb2.ListProvidersRequest,
    PROVIDERS + "DeleteProvider": providers_pb2.DeleteProviderRequest,
}

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- a live gateway on a private loop --------------------------------------------------------


class Live:
    def __init__(self, loop: asyncio.AbstractEventLoop, gw: RunningGateway, upstream: FakeUpstream) -> None:
        self.loop = loop
        self.gw = gw
        self.upstream = upstream

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@contextmanager
def live_gateway(tmp_path: Path) -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    try:
        upstream = FakeUpstream()
        loop.run_until_complete(upstream.start())
        stack.push_async_callback(upstream.stop)
        base = upstream.base_url
        config = make_settings(
            tmp_path,
            # Every URL the gateway knows points at the fake: nothing can leave the machine.
            openai_base_url=base,
            openrouter_base_url=base,
            openai_api_key="sk-fuzz-0123456789abcdefghij",
            allowed_endpoints=(base, base.removesuffix("/v1")),
            encryption_key="fuzz-passphrase-0123",
            upstream_timeout=5.0,
        )
        gw = loop.run_until_complete(stack.enter_async_context(running_gateway(config)))
        yield Live(loop, gw, upstream)
        loop.run_until_complete(assert_serving(gw.channel))
    finally:
        loop.run_until_complete(stack.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def check_call(live: Live, method: str, data: bytes) -> None:
    """One call: OK, or a clean status with well-formed details."""
    try:
        await call_raw(live.gw.channel, method, data, timeout=30)
    except grpc.aio.AioRpcError as err:
        assert err.code() not in FORBIDDEN, (method, data, err.code(), err.details())
        assert err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (method, data, "hung")
        details(err)  # exactly one ErrorInfo in domain llmgateway, status consistent with the call


# -- strategies: any message of a type, with values that sometimes reach deep ------------------

ENDPOINT_TYPES = ["openai", "ollama", "llamacpp", "vllm", "lmstudio", "koboldcpp", "webui", "anthropic", ""]
FIELD_HINTS: dict[str, Callable[[str], st.SearchStrategy[Any]]] = {
    "model_endpoint_type": lambda base: st.sampled_from(ENDPOINT_TYPES) | st.text(max_size=10),
    "model_endpoint": lambda base: (
        st.sampled_from(
            [
                base,
                base.removesuffix("/v1"),
                "",
                "http://169.254.169.254/v1",
                "http://127.0.0.1:1/v1",
                "ftp://x",
            ]
        )
        | st.text(max_size=20)
    ),
    "base_url": lambda base: (
        st.sampled_from([base, "", "http://10.0.0.1", "https://x.example"]) | st.text(max_size=20)
    ),
    "model": lambda base: (
        st.sampled_from(["gpt-4o-mini", "o1", "deepseek-r1", "qwen", ""]) | st.text(max_size=10)
    ),
    "model_wrapper": lambda base: st.sampled_from(
        ["chatml", "llama3", "chatml-grammar", "llama3-grammar", "x"]
    ),
    "function_call": lambda base: (
        st.sampled_from(["", "auto", "required", "none", "f", "g"]) | st.text(max_size=8)
    ),
    "force_tool_call": lambda base: st.sampled_from(["", "f", "g"]) | st.text(max_size=8),
    "name": lambda base: st.sampled_from(["f", "g", "send_message", ""]) | st.text(max_size=12),
    "arguments": lambda base: (
        st.sampled_from(['{"a": 1}', "{}", "", "[", "null", '{"inner_thoughts": "x"}']) | st.text(max_size=12)
    ),
    "context_window": lambda base: st.sampled_from([0, 1, 10, 128000, -1, 2**31 - 1]),
    "page_token": lambda base: st.text(max_size=30) | st.sampled_from(["", "MjAyNC0wMS0wMVQwMDowMDowMHx4"]),
    "page_size": lambda base: st.integers(min_value=-(2**31), max_value=2**31 - 1),
    "handle": lambda base: st.sampled_from(["", "openai/gpt-4o", "vllm/qwen", "x"]),
    "reasoning_effort": lambda base: st.sampled_from(["", "low", "high", "x"]),
}

_INT_RANGES = {
    descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
SCHEMA_KEYS = st.sampled_from(["type", "properties", "required", "items", "enum", "description", "x"])
SCHEMAS = st.recursive(
    st.sampled_from(["object", "string", "integer", "array", "null"]) | JSON,
    lambda inner: (
        st.dictionaries(SCHEMA_KEYS | st.text(max_size=6), inner, max_size=4) | st.lists(inner, max_size=3)
    ),
    max_leaves=15,
)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def _scalar(field: descriptor.FieldDescriptor, base: str) -> st.SearchStrategy[Any]:
    if field.name in FIELD_HINTS:
        return FIELD_HINTS[field.name](base)
    t = field.type
    if t == descriptor.FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if t == descriptor.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == descriptor.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (descriptor.FieldDescriptor.TYPE_FLOAT, descriptor.FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == descriptor.FieldDescriptor.TYPE_FLOAT else 64)
    if t == descriptor.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) | st.integers(min_value=-5, max_value=1000)  # open enums
    low, high = _INT_RANGES[t]
    return st.integers(min_value=low, max_value=high) | st.sampled_from([0, 1, -1])


def message_strategy(cls: type[Message], base: str, depth: int = 0) -> st.SearchStrategy[Message]:
    desc = cls.DESCRIPTOR
    if desc.full_name == "google.protobuf.Struct":
        return st.dictionaries(st.text(max_size=8), SCHEMAS, max_size=4).map(_struct)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3 or field.message_type.GetOptions().map_entry:
                continue
            sub_cls = _message_class(field)
            if sub_cls is None:
                continue
            sub = message_strategy(sub_cls, base, depth + 1)
            value = st.lists(sub, max_size=3) if _repeated(field) else sub
        else:
            scalar = _scalar(field, base)
            value = st.lists(scalar, max_size=3) if _repeated(field) else scalar
        parts[field.name] = st.none() | value

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for name, strategy in parts.items():
            value = draw(strategy)
            if value is None:
                continue
            field = desc.fields_by_name[name]
            if _repeated(field):
                target = getattr(message, name)
                for item in value:
                    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


def _repeated(field: descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message_class(field: descriptor.FieldDescriptor) -> type[Message] | None:
    from google.protobuf import message_factory

    try:
        return message_factory.GetMessageClass(field.message_type)  # type: ignore[no-any-return]
    except (TypeError, KeyError):
        return None


def plausible_chat_request(base: str) -> st.SearchStrategy[Message]:
    """Requests that mostly pass validation, so the fuzzer reaches planning, tools and the upstream."""
    roles = st.sampled_from(
        [
            chat_pb2.ROLE_SYSTEM,
            chat_pb2.ROLE_DEVELOPER,
            chat_pb2.ROLE_USER,
            chat_pb2.ROLE_ASSISTANT,
            chat_pb2.ROLE_TOOL,
        ]
    )
    tool_call = st.builds(
        chat_pb2.ToolCall,
        id=st.sampled_from(["c1", "c2", ""]),
        name=FIELD_HINTS["name"](base),
        arguments=st.sampled_from(['{"a": 1}', "{}", '{"inner_thoughts": "hm", "x": [1, 2]}', "[]", "1"]),
    )

    @st.composite
    def message(draw: st.DrawFn) -> chat_pb2.Message:
        role = draw(roles)
        m = chat_pb2.Message(
            role=role, content=draw(st.text(max_size=60)), name=draw(st.sampled_from(["", "bob"]))
        )
        if role == chat_pb2.ROLE_ASSISTANT:
            m.tool_calls.extend(draw(st.lists(tool_call, max_size=2)))
        if role == chat_pb2.ROLE_TOOL:
            m.tool_call_id = draw(st.sampled_from(["c1", "c2", "zz"]))
        if draw(st.booleans()) and role == chat_pb2.ROLE_USER:
            m.parts.add(text=draw(st.text(max_size=10)))
            if draw(st.booleans()):
                m.parts.add().image_url.url = draw(
                    st.sampled_from(["https://x/y.png", "data:image/png;base64,AA", ""])
                )
        return m

    function = st.builds(
        lambda name, desc, params: chat_pb2.FunctionDefinition(
            name=name, description=desc, parameters=params
        ),
        st.sampled_from(["f", "g", "send_message", "search_web"]),
        st.text(max_size=20),
        st.dictionaries(SCHEMA_KEYS, SCHEMAS, max_size=4).map(_struct),
    )

    @st.composite
    def request(draw: st.DrawFn) -> chat_pb2.CreateRequest:
        config = chat_pb2.LLMConfig(
            model=draw(st.sampled_from(["gpt-4o-mini", "o1-mini", "deepseek-reasoner", "qwen2.5", "gpt-5"])),
            model_endpoint_type=draw(st.sampled_from(ENDPOINT_TYPES[:7])),
            model_endpoint=draw(st.sampled_from([base, base.removesuffix("/v1"), ""])),
            context_window=draw(st.sampled_from([0, 128000, 8192, 30])),
            put_inner_thoughts_in_kwargs=draw(st.booleans()),
            model_wrapper=draw(FIELD_HINTS["model_wrapper"](base)),
            handle=draw(FIELD_HINTS["handle"](base)),
            reasoning_effort=draw(FIELD_HINTS["reasoning_effort"](base)),
        )
        if draw(st.booleans()):
            config.temperature = draw(st.floats(min_value=0, max_value=2))
        if draw(st.booleans()):
            config.max_tokens = draw(st.integers(min_value=1, max_value=4096))
        r = chat_pb2.CreateRequest(
            llm_config=config,
            messages=draw(st.lists(message(), min_size=1, max_size=4)),
            functions=draw(st.lists(function, max_size=3, unique_by=lambda f: f.name)),
            function_call=draw(FIELD_HINTS["function_call"](base)),
            force_tool_call=draw(FIELD_HINTS["force_tool_call"](base)),
            first_message=draw(st.booleans()),
            user_id=draw(st.sampled_from(["", "u1"])),
        )
        if draw(st.booleans()):
            r.use_tool_naming = draw(st.booleans())
        if draw(st.booleans()):
            r.put_inner_thoughts_first = draw(st.booleans())
        return r

    return request()


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with a few corrupted, cut or appended."""
    return st.one_of(
        st.just(data),
        st.integers(min_value=0, max_value=max(0, len(data))).map(lambda n: data[:n]),
        st.binary(min_size=1, max_size=16).map(lambda tail: data + tail),
        st.tuples(st.integers(min_value=0, max_value=max(0, len(data) - 1)), st.integers(0, 255)).map(
            lambda p: data[: p[0]] + bytes([p[1]]) + data[p[0] + 1 :] if data else bytes([p[1]])
        ),
    )


# What the fake upstream answers while the fuzzer runs (good and bad alike).
_REPLIES = [
    Reply(json_body=completion()),
    Reply(sse=text_stream(["a", "b"])),
    Reply(status=400, json_body={"error": {"message": "no"}}),
    Reply(status=429),
    Reply(status=503, raw=b"<html>down</html>"),
    Reply(raw=b"not json"),
    Reply(
        json_body={
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{not json"},
                            }
                        ],
                    }
                }
            ]
        }
    ),
    Reply(
        json_body={
            "choices": [
                {
                    "index": 0,
                    "text": '{"function": "send_message", "params": {"message": "hi"}}',
                    "finish_reason": "stop",
                }
            ],
            "response": "x",
            "content": "y",
        }
    ),
]


# -- the properties --------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(REQUEST_TYPES), ids=lambda m: m.rsplit("/", 1)[-1])
def test_random_bytes_get_clean_statuses(tmp_path: Path, method: str) -> None:
    with live_gateway(tmp_path) as live:

        @FUZZ_SETTINGS
        @given(data=st.binary(max_size=600))
        def prop(data: bytes) -> None:
            live.run(check_call(live, method, data))

        prop()


@pytest.mark.parametrize("method", list(REQUEST_TYPES), ids=lambda m: m.rsplit("/", 1)[-1])
def test_random_well_formed_requests_get_clean_statuses(tmp_path: Path, method: str) -> None:
    with live_gateway(tmp_path) as live:
        live.upstream.default = Reply(json_body=completion())
        base = live.upstream.base_url
        messages = message_strategy(REQUEST_TYPES[method], base)
        if method.startswith(CHAT):
            messages = messages | plausible_chat_request(base) | plausible_chat_request(base)
        strategy = messages.map(lambda m: m.SerializeToString())

        @FUZZ_SETTINGS
        @given(data=strategy, upstream_reply=st.sampled_from(_REPLIES))
        def prop(data: bytes, upstream_reply: Reply) -> None:
            live.upstream.replies.clear()
            live.upstream.script(upstream_reply, upstream_reply, upstream_reply)
            live.run(check_call(live, method, data))

        prop()

        @FUZZ_SETTINGS
        @given(
            data=(
                message_strategy(REQUEST_TYPES[method], base)
                | (plausible_chat_request(base) if method.startswith(CHAT) else st.nothing())
            ).flatmap(lambda m: mutated(m.SerializeToString()))
        )
        def prop_mutated(data: bytes) -> None:
            live.run(check_call(live, method, data))

        prop_mutated()
        if method in (CHAT + "Create", CHAT + "StreamCreate"):
            # Some random requests were valid enough to reach the upstream: the path was exercised.
            assert live.upstream.requests
