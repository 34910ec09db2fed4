"""The planning fast paths send, refuse and count exactly what the general code does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from llmgateway.v1 import chat_pb2

from server.core import openai_request
from server.core.openai_request import SentFunctions, build_chat_body
from server.gateway import _translated
from server.providers.openai_compat import OPENAI
from server.providers.registry import provider_for

ENDPOINT = "https://api.openai.com/v1"
LLAMA_CPP = "http://127.0.0.1:8080/v1"


def _function(name: str, **properties: Any) -> chat_pb2.FunctionDefinition:
    fn = chat_pb2.FunctionDefinition(name=name, description=f'{name} does a thing \u00e9\u2603 "quoted"')
    fn.parameters.update(
        {"type": "object", "properties": properties or {"x": {"type": "string"}}, "required": ["x"]}
    )
    return fn


def _request(*functions: chat_pb2.FunctionDefinition, **fields: Any) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini", model_endpoint=ENDPOINT, model_endpoint_type="openai"
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
        functions=list(functions),
        user_id="user-1",
        **fields,
    )


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    openai_request.clear_caches()
    yield
    openai_request.clear_caches()


def test_a_shared_tool_list_is_sent_as_the_bytes_of_the_whole_body() -> None:
    request = _request(
        _function("a"), _function("b", y={"type": "integer", "minimum": 1}), function_call="auto"
    )
    for _ in range(3):  # the first call makes the fragment, the others reuse it
        body = build_chat_body(request, stream=False, endpoint=ENDPOINT)
        tools = body["tools"]
        assert type(tools) is SentFunctions and tools.shared
        notes, raw = _translated(OPENAI, body, False)
        assert notes == []
        assert raw == orjson.dumps(body)  # the general serialization, byte for byte
        # Keys after `tools` keep their places around the fragment.
        assert list(orjson.loads(raw)) == [
            "model",
            "messages",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "user",
        ]
        assert body["tools"] is tools  # the body unpacked against is not changed
    assert tools.json() is tools.json()


def test_each_tool_list_has_its_own_fragment() -> None:
    first = build_chat_body(_request(_function("a")), stream=True, endpoint=ENDPOINT)
    second = build_chat_body(_request(_function("b")), stream=True, endpoint=ENDPOINT)
    for body in (first, second, first):
        assert _translated(OPENAI, body, True)[1] == orjson.dumps(body)
    assert first["tools"].json() != second["tools"].json()


def test_lists_not_shared_are_serialized_whole() -> None:
    # A forced call to llama.cpp's server sends the forced tool alone: a fresh list per body.
    request = _request(_function("a"), _function("b"), function_call="b")
    request.llm_config.handle = "llamacpp/qwen2.5"  # known by its name on a first call
    body = build_chat_body(request, stream=False, endpoint=LLAMA_CPP)
    assert not body["tools"].shared and len(body["tools"]) == 1
    assert _translated(OPENAI, body, False)[1] == orjson.dumps(body)
    # A set too large to cache is prepared anew for every body, never shared.
    big = [_function(f"f{i}", x={"type": "string", "description": "d" * 3000}) for i in range(100)]
    body = build_chat_body(_request(*big), stream=False, endpoint=ENDPOINT)
    assert not body["tools"].shared
    assert _translated(OPENAI, body, False)[1] == orjson.dumps(body)


def test_a_provider_that_rebuilds_the_tools_sends_its_own() -> None:
    request = _request(_function("a"))
    body = build_chat_body(request, stream=False, endpoint=ENDPOINT)
    provider = provider_for("deepseek")
    upstream, _ = provider.build_body(body, stream=False)
    assert upstream["tools"] is not body["tools"]
    assert _translated(provider, body, False)[1] == orjson.dumps(upstream)


@pytest.mark.parametrize(
    ("model", "fields", "dropped"),
    [
        ("o3-mini", {"top_p": 0.5, "presence_penalty": 1.0}, ["top_p", "presence_penalty"]),
        ("o3-mini", {"frequency_penalty": 1.0, "top_p": 0.5}, ["top_p", "frequency_penalty"]),
        ("o3-mini", {}, []),
        ("gpt-4o", {"top_p": 0.5}, []),  # only the reasoning families refuse them
    ],
)
def test_reasoning_models_refuse_sampling_parameters_in_their_order(
    model: str, fields: dict[str, float], dropped: list[str]
) -> None:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    upstream, notes = OPENAI.build_body(body, stream=False)
    assert notes == dropped
    assert list(upstream) == [key for key in body if key not in dropped]
    assert (upstream is body) == (not dropped)


# -- the messages' fields, read once by validation and built from --------------------------------

M = chat_pb2.Message
SYSTEM, USER, ASSISTANT, TOOL = (
    chat_pb2.ROLE_SYSTEM,
    chat_pb2.ROLE_USER,
    chat_pb2.ROLE_ASSISTANT,
    chat_pb2.ROLE_TOOL,
)
CALL = chat_pb2.ToolCall(id="call-1", name="a", arguments='{"x": "1"}')
SIGNED = chat_pb2.ToolCall(id="call-2", name="a", arguments="{}", thought_signature="sig")
THINKING = chat_pb2.ThinkingBlock(type="thinking", text="hmm", signature="s")
TEXT = chat_pb2.ContentPart(text="part text")
IMAGE = chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url="https://example.com/a.png", detail="low"))

HISTORIES = {
    "plain": [M(role=SYSTEM, content="be brief"), M(role=USER, content="hi \u2603")],
    "developer": [M(role=chat_pb2.ROLE_DEVELOPER, content="rules"), M(role=USER, content="")],
    "parts": [M(role=USER, content="look", parts=[TEXT, IMAGE]), M(role=USER, parts=[IMAGE])],
    "tool turn": [
        M(role=USER, content="go", name="alice"),
        M(role=ASSISTANT, content="", tool_calls=[CALL, SIGNED]),
        M(role=TOOL, content="done", tool_call_id="call-1", name="a"),
        M(role=ASSISTANT, content="said", tool_calls=[CALL]),
    ],
    # An assistant's parts with tool calls and no text: its content stays the parts array.
    "assistant parts": [M(role=USER, content="x"), M(role=ASSISTANT, parts=[TEXT], tool_calls=[CALL])],
    "reasoning": [
        M(role=USER, content="q"),
        M(role=ASSISTANT, content="a", thinking_blocks=[THINKING], reasoning_content="because"),
        # Only an assistant's are sent; a user's still count toward validation's bounds.
        M(role=USER, content="q2", thinking_blocks=[THINKING], reasoning_content="r"),
    ],
}


@pytest.mark.parametrize("history", HISTORIES, ids=list(HISTORIES))
@pytest.mark.parametrize("model", ["gpt-4o-mini", "o3-mini", "gpt-3.5-turbo"])
def test_a_body_built_from_validations_read_is_the_same_bytes(history: str, model: str) -> None:
    from server.core.messages import to_openai_messages
    from server.core.validation import validate_request

    request = _request(_function("a"))
    request.llm_config.model = model
    request.messages.extend(HISTORIES[history])
    del request.messages[0]  # _request's own "hi"
    read = validate_request(request)
    assert [(m, role, content, list(parts)) for m, role, content, parts in read] == [
        (m, m.role, m.content, list(m.parts)) for m in request.messages
    ]
    for stream in (False, True):
        general = build_chat_body(request, stream=stream, endpoint=ENDPOINT)
        shared = build_chat_body(request, stream=stream, endpoint=ENDPOINT, read=read)
        assert orjson.dumps(shared) == orjson.dumps(general)
    assert to_openai_messages(request.messages, model=model, read=read) == to_openai_messages(
        request.messages, model=model
    )


def test_the_body_takes_its_messages_from_the_read() -> None:
    # The read is what the messages are built from (a stale one would show): here a content
    # changed after validation, which the request path never does, is not seen.
    from server.core.validation import validate_request

    request = _request()
    read = validate_request(request)
    request.messages[0].content = "changed"
    assert build_chat_body(request, stream=False, endpoint=ENDPOINT, read=read)["messages"] == [
        {"role": "user", "content": "hi"}
    ]
    assert build_chat_body(request, stream=False, endpoint=ENDPOINT)["messages"][0]["content"] == "changed"


def test_an_assistants_parts_stay_its_content_beside_tool_calls() -> None:
    from server.core.validation import validate_request

    request = _request()
    request.messages.extend(HISTORIES["assistant parts"][1:])
    call = {"id": "call-1", "type": "function", "function": {"name": "a", "arguments": '{"x": "1"}'}}
    expected = {"role": "assistant", "content": [{"type": "text", "text": "part text"}], "tool_calls": [call]}
    for read in (None, validate_request(request)):
        assert build_chat_body(request, stream=False, endpoint=ENDPOINT, read=read)["messages"][1] == expected


def test_function_names_come_from_the_cache_only_for_a_cacheable_set() -> None:
    from server.core.validation import function_keys

    small = _request(_function("a"), _function("b")).functions
    keys = function_keys(small)
    assert openai_request._function_names(small, keys) == ("a", "b")
    assert openai_request._function_names(small, keys) is openai_request._function_names(small, keys)
    big = _request(*[_function(f"f{i}", x={"type": "string", "description": "d" * 3000}) for i in range(100)])
    big_keys = function_keys(big.functions)
    assert openai_request._function_names(big.functions, big_keys) == [f"f{i}" for i in range(100)]
    assert openai_request._NAMES.get(big_keys) is None  # never kept
    assert openai_request._function_names(small, None) == ["a", "b"]


def test_a_complete_inline_count_is_the_general_count() -> None:
    from server.core import tokens

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "al"}]
    functions = openai_request.prompt_functions(_request(_function("a"), _function("b")))
    for model in ("gpt-4o-mini", "gpt-4", "llama-3"):
        started = tokens.start_request_count(messages, functions, model)
        assert started == tokens.count_request_tokens(messages, functions, model)
        assert type(started) is tokens.TokenCount


def test_a_shared_function_list_is_counted_once_and_forgotten_with_its_entries() -> None:
    from server.core import tokens

    tokens.clear_memo()
    a = openai_request.prompt_functions(_request(_function("a"), _function("b")))
    b = openai_request.prompt_functions(_request(_function("c", y={"type": "string", "enum": ["p", "q"]})))
    assert type(a) is tokens.SharedFunctionList and type(b) is tokens.SharedFunctionList
    encoding, name = tokens.encoding_for_model("gpt-4o-mini")
    expected = {id(fns): tokens.count_function_tokens(list(fns), encoding) for fns in (a, b)}  # plain lists
    assert not a.counted and not b.counted  # plain lists (the copies) are never remembered whole
    for _ in range(2):
        for fns in (a, b):
            started = tokens.start_request_count([{"role": "user", "content": "hi"}], fns, "gpt-4o-mini")
            assert isinstance(started, tokens.TokenCount)
            assert started.function_tokens == expected[id(fns)]
    assert a.counted[name] == (tokens._FUNCTION_TOKENS_GENERATION, expected[id(a)])
    # The entry memo starting over forgets the lists' counts too: each is counted anew.
    with tokens._MEMO_LOCK:
        tokens._clear_function_memo()
    assert a.counted[name][0] != tokens._FUNCTION_TOKENS_GENERATION  # stale: not used
    assert tokens.count_function_tokens(a, encoding) == expected[id(a)]
    assert a.counted[name] == (tokens._FUNCTION_TOKENS_GENERATION, expected[id(a)])


def test_a_list_counted_across_a_clear_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.core import tokens

    tokens.clear_memo()
    functions = openai_request.prompt_functions(_request(_function("a"), _function("b")))
    encoding, name = tokens.encoding_for_model("gpt-4o-mini")
    expected = tokens.count_function_tokens(list(functions), encoding)
    tokens.clear_memo()
    monkeypatch.setattr(tokens, "_FUNCTION_TOKENS_MAX", 1)  # each entry kept clears the memo
    assert tokens.count_function_tokens(functions, encoding) == expected
    assert name not in functions.counted


def test_a_tool_list_whose_json_is_large_keeps_no_copy_of_it() -> None:
    # 400 functions of a few proto bytes each (~2 KB of keys; cached, each counted as
    # validation.LIST_BYTES_PER_FUNCTION) become ~100 KB of JSON with inner thoughts and strict
    # form: the cached lists held that much each again beside their dicts. Such a list is
    # serialized with the body, as any other; smaller ones keep their fragment.
    from server.core.validation import cacheable, function_keys

    request = _request(*[chat_pb2.FunctionDefinition(name=f"f{i}") for i in range(400)])
    request.llm_config.put_inner_thoughts_in_kwargs = True
    assert cacheable(function_keys(request.functions))
    for _ in range(2):
        body = build_chat_body(request, stream=False, endpoint=ENDPOINT)
        tools = body["tools"]
        assert tools.shared
        raw = _translated(OPENAI, body, False)[1]
        assert raw == orjson.dumps(body)
        assert len(orjson.dumps(tools)) > openai_request.MAX_KEPT_TOOLS_JSON_BYTES
        assert tools.json() is None
    small = build_chat_body(_request(_function("a")), stream=False, endpoint=ENDPOINT)["tools"]
    assert small.json() is not None and small.json() is small.json()


class _CountingMemo(dict[Any, Any]):
    """The entry memo, counting its lookups (a list remembered whole looks none up)."""

    lookups = 0

    def get(self, key: Any, default: Any = None) -> Any:
        type(self).lookups += 1
        return super().get(key, default)


def test_a_shared_list_dropped_by_its_cache_is_not_held_and_a_live_one_is_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The prompt-list cache drops its oldest lists (FIFO) and makes a new list for the same
    # functions later, while their entries stay the same dicts (the per-function cache): the
    # entry memo then never starts over. A dropped list must not stay alive for its count, nor
    # crowd out the live ones (a memo of lists full of dead ones remembered no other).
    import gc

    from server.core import tokens

    tokens.clear_memo()
    monkeypatch.setattr(openai_request, "_PROMPT_LISTS", openai_request._function_cache(1))
    monkeypatch.setattr(tokens, "_FUNCTION_TOKENS_MAX", 16)  # the entry memo holds the 3 entries
    monkeypatch.setattr(tokens, "_FUNCTION_TOKENS", _CountingMemo())
    encoding, _ = tokens.encoding_for_model("gpt-4o-mini")
    sets = [_request(_function("a"), _function("b")), _request(_function("c"))]
    prompt = openai_request.prompt_functions
    expected = [tokens.count_function_tokens(list(prompt(r)), encoding) for r in sets]
    for step in range(40):  # each step drops the other set's list: a new list object each time
        functions = openai_request.prompt_functions(sets[step % 2])
        assert tokens.count_function_tokens(functions, encoding) == expected[step % 2]
    del functions
    live = openai_request.prompt_functions(sets[0])
    assert tokens.count_function_tokens(live, encoding) == expected[0]
    _CountingMemo.lookups = 0
    assert tokens.count_function_tokens(live, encoding) == expected[0]
    assert _CountingMemo.lookups == 0  # remembered whole
    gc.collect()
    held = [o for o in gc.get_objects() if type(o) is tokens.SharedFunctionList]
    assert len(held) == 1 and held[0] is live  # no dropped list kept alive for its count


def test_validation_keeps_no_fields_of_a_request_it_refuses_for_its_message_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An empty message is 4 bytes on the wire: a 64 MiB request carries ~16 million. Validation
    # reads every one (to name every problem) and refuses the request; kept, their fields held
    # ~200 bytes each (~3 GB for one request) until it raised. Under the bound they are kept.
    import tracemalloc

    from server.core import validation
    from server.errors import InvalidRequest

    monkeypatch.setattr(validation, "MAX_MESSAGES", 100)
    one = chat_pb2.CreateRequest(messages=[M(role=USER)]).SerializeToString()
    request = chat_pb2.CreateRequest.FromString(_request().SerializeToString() + one * 50_000)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match="at most 100 messages"):
            validation.validate_request(request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # kept: ~10 MB
    del request.messages[100:]
    assert len(validation.validate_request(request)) == 100
