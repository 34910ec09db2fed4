"""The caches keyed by functions' bytes hold a bounded number of key bytes, whatever callers send.

A caller chooses its functions' bytes: bounded in entries alone (2,048 per cache), distinct
large functions pinned their keys and everything converted from them: GBs from a few big
requests. Each such cache now stops at MAX_HELD_FUNCTION_BYTES of keys and keeps nothing past
MAX_CACHED_FUNCTION_BYTES per entry; what it keeps still works as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llmgateway.v1 import chat_pb2

from server.core import openai_request, validation
from server.core.openai_request import build_chat_body, prompt_functions
from server.core.validation import (
    MAX_CACHED_FUNCTION_BYTES,
    MAX_HELD_FUNCTION_BYTES,
    function_keys,
    validate_request,
)
from server.errors import InvalidRequest

ENDPOINT = "https://api.openai.com/v1"

# Every cache whose keys are (or start with) functions' bytes.
CACHES = {
    "prompt": openai_request._PROMPT_CACHE,
    "sent": openai_request._SENT_CACHE,
    "prompt lists": openai_request._PROMPT_LISTS,
    "sent lists": openai_request._SENT_LISTS,
    "names": openai_request._NAMES,
    "problems": validation._FUNCTION_PROBLEMS,
    "schemas": validation._SCHEMA_CACHE,
}


def _key_bytes(key: Any) -> int:
    first = key[0] if isinstance(key, tuple) and key and not isinstance(key[0], int) else key
    if isinstance(first, bytes):
        return len(first)
    if isinstance(key, bytes):
        return len(key)
    return sum(len(part) for part in first)  # a tuple of function keys


def _held(cache: Any) -> int:
    return sum(_key_bytes(key) for key in cache.keys())


def _big_function(tag: int, size: int) -> chat_pb2.FunctionDefinition:
    fn = chat_pb2.FunctionDefinition(name=f"f{tag}", description="a tool")
    fn.parameters.update(
        {
            "type": "object",
            "properties": {"x": {"type": "string", "description": f"{tag}:" + "d" * size}},
            "required": ["x"],
        }
    )
    return fn


def _request(fn: chat_pb2.FunctionDefinition) -> chat_pb2.CreateRequest:
    return chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(
            model="gpt-4o-mini", model_endpoint=ENDPOINT, model_endpoint_type="openai"
        ),
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
        functions=[fn],
        function_call="auto",
    )


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    openai_request.clear_caches()
    validation._FUNCTION_PROBLEMS.clear()
    validation._SCHEMA_CACHE.clear()
    yield
    openai_request.clear_caches()
    validation._FUNCTION_PROBLEMS.clear()
    validation._SCHEMA_CACHE.clear()


def _prepare(request: chat_pb2.CreateRequest) -> None:
    keys = function_keys(request.functions)
    validate_request(request, keys)
    prompt_functions(request, endpoint=ENDPOINT, keys=keys)
    build_chat_body(request, stream=False, endpoint=ENDPOINT, keys=keys)


def test_distinct_big_functions_hold_at_most_the_byte_bound_in_every_cache() -> None:
    size = 200 * 1024  # under the entry bound: each is kept, until the byte bound
    count = MAX_HELD_FUNCTION_BYTES // size + 20
    for tag in range(count):
        _prepare(_request(_big_function(tag, size)))
    for name, cache in CACHES.items():
        assert len(cache) > 0, name  # the bound keeps some: they are cached, not refused
        assert _held(cache) <= MAX_HELD_FUNCTION_BYTES, name
        assert len(cache) < count, name


def test_a_function_past_the_entry_bound_is_never_kept_and_still_works() -> None:
    fn = _big_function(1, MAX_CACHED_FUNCTION_BYTES + 1024)
    request = _request(fn)
    for _ in range(2):
        _prepare(request)
        body = build_chat_body(request, stream=False, endpoint=ENDPOINT)
        assert body["tools"][0]["function"]["name"] == "f1"
    for name, cache in CACHES.items():
        assert len(cache) == 0, name


def test_a_usual_tool_set_is_kept_and_found_again() -> None:
    request = _request(_big_function(7, 2000))
    _prepare(request)
    first = build_chat_body(request, stream=False, endpoint=ENDPOINT)["tools"]
    second = build_chat_body(request, stream=False, endpoint=ENDPOINT)["tools"]
    assert first is second  # the shared list, from the cache
    for name, cache in CACHES.items():
        assert len(cache) == 1, name


def _tiny_request(count: int, prefix: str = "") -> chat_pb2.CreateRequest:
    request = _request(chat_pb2.FunctionDefinition(name=f"{prefix}t0"))
    request.functions.extend(chat_pb2.FunctionDefinition(name=f"{prefix}t{i}") for i in range(1, count))
    request.llm_config.put_inner_thoughts_in_kwargs = True
    return request


def test_a_list_of_many_tiny_functions_is_counted_by_what_it_pins_not_by_its_key_bytes() -> None:
    # 1,000 functions of 3-5 character names: ~7 KB of keys, ~2 MB of prepared dicts (with inner
    # thoughts and strict form). Counted by key bytes, 1,024 such lists pinned ~2 GB per cache.
    request = _tiny_request(1000)
    assert sum(map(len, function_keys(request.functions))) < 8 * 1024
    _prepare(request)
    for name in ("prompt lists", "sent lists", "names", "problems"):
        assert len(CACHES[name]) == 0, name
    # Still prepared as before (the per-function caches keep the functions themselves).
    body = build_chat_body(request, stream=False, endpoint=ENDPOINT)
    assert len(body["tools"]) == 1000


def test_distinct_lists_of_tiny_functions_pin_a_bounded_number_of_functions() -> None:
    for tag in range(40):
        _prepare(_tiny_request(200, prefix=f"l{tag}_"))
    held = sum(len(found) for _, found in openai_request._PROMPT_LISTS.items())
    assert held == 40 * 200  # kept: 200 tiny functions is a usual large tool set
    for name in ("prompt lists", "sent lists", "names", "problems"):
        cache = CACHES[name]
        lists = [key if name in ("names", "problems") else key[0] for key in cache.keys()]
        assert cache.held_bytes >= sum(map(len, lists)) * validation.LIST_BYTES_PER_FUNCTION, name


def test_empty_functions_past_the_limit_leave_their_problems_uncached() -> None:
    # An empty FunctionDefinition is 2 bytes on the wire and 0 bytes of key: 100,000 of them
    # (200 KB) made 100,001 problems, kept under a key counted as 0 bytes (2,048 such lists).
    request = _request(chat_pb2.FunctionDefinition())
    request.functions.extend(chat_pb2.FunctionDefinition() for _ in range(20_000))
    keys = function_keys(request.functions)
    assert sum(map(len, keys)) == 0
    with pytest.raises(InvalidRequest):
        validate_request(request, keys)
    assert len(validation._FUNCTION_PROBLEMS) == 0
