from __future__ import annotations

import copy
from typing import Any

import pytest

from server.errors import InvalidRequest
from server.providers.local.wrappers import (
    FIRST_MESSAGE_PRIME,
    first_message_prefix,
    render_prompt,
    resolve_wrapper,
    stop_strings,
    wrapper_uses_grammar,
)

SEND_MESSAGE: dict[str, Any] = {
    "name": "send_message",
    "description": "Sends a message to the human user.",
    "parameters": {
        "type": "object",
        "properties": {"message": {"type": "string", "description": "Message contents."}},
        "required": ["message"],
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "archival_memory_search",
        "description": "Search archival memory.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "page": {"type": ["integer", "null"], "description": "Result page."},
                "order": {"type": "string", "enum": ["newest", "oldest"]},
            },
            "required": ["query"],
        },
    },
}
FUNCTIONS = [SEND_MESSAGE, SEARCH]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are Sam."},
    {"role": "user", "content": "Hi!"},
    {
        "role": "assistant",
        "content": "User greeted me.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "send_message", "arguments": '{"message": "Hello!"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "OK"}'},
    {"role": "user", "content": "Find my notes about cats."},
]

FUNCTION_BLOCK_WITH_THINKING = (
    "Choose the one function below that best continues the conversation and call it. "
    'Answer with a single JSON object and nothing else: {"function": "<function name>", '
    '"params": {<arguments>}}, using double quotes.\n'
    "Available functions:\n"
    "send_message: Sends a message to the human user.\n"
    "  params:\n"
    "    thinking (string, required): Deep inner monologue private to you only.\n"
    "    message (string, required): Message contents.\n"
    "archival_memory_search: Search archival memory.\n"
    "  params:\n"
    "    thinking (string, required): Deep inner monologue private to you only.\n"
    "    query (string, required): What to look for.\n"
    "    page (integer or null): Result page.\n"
    '    order (string) One of: "newest", "oldest".'
)

EXPECTED_CHATML = (
    "<|im_start|>system\n"
    "You are Sam.\n\n" + FUNCTION_BLOCK_WITH_THINKING + "<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n"
    '{"function": "send_message", "params": {"thinking": "User greeted me.", "message": "Hello!"}}'
    "<|im_end|>\n"
    '<|im_start|>assistant\nFUNCTION RETURN:\n{"status": "OK"}<|im_end|>\n'
    "<|im_start|>user\nFind my notes about cats.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# No BOS (issue 14): the server adds the model's own; one written here was a second one.
EXPECTED_LLAMA3 = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "You are Sam.\n\n" + FUNCTION_BLOCK_WITH_THINKING + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"function": "send_message", "params": {"thinking": "User greeted me.", "message": "Hello!"}}'
    "<|eot_id|>"
    '<|start_header_id|>assistant<|end_header_id|>\n\nFUNCTION RETURN:\n{"status": "OK"}<|eot_id|>'
    "<|start_header_id|>user<|end_header_id|>\n\nFind my notes about cats.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def render(wrapper: str, **kwargs: Any) -> str:
    options: dict[str, Any] = {"first_message": False, "put_inner_thoughts_in_kwargs": True}
    options.update(kwargs)
    messages = options.pop("messages", CONVERSATION)
    functions = options.pop("functions", FUNCTIONS)
    return render_prompt(wrapper, messages, functions, **options)


@pytest.mark.parametrize("wrapper", ["chatml", "", "chatml-grammar", " ChatML "])
def test_chatml_exact_prompt(wrapper: str) -> None:
    assert render(wrapper) == EXPECTED_CHATML


@pytest.mark.parametrize("wrapper", ["llama3", "llama3-grammar"])
def test_llama3_exact_prompt(wrapper: str) -> None:
    assert render(wrapper) == EXPECTED_LLAMA3


def test_first_message_primes_send_message() -> None:
    prompt = render("chatml", first_message=True)
    assert prompt == EXPECTED_CHATML + FIRST_MESSAGE_PRIME
    assert render("llama3", first_message=True) == EXPECTED_LLAMA3 + FIRST_MESSAGE_PRIME
    assert first_message_prefix(FUNCTIONS, first_message=True) == '{"function": "send_message",'
    assert first_message_prefix(FUNCTIONS, first_message=False) == ""


def test_first_message_without_send_message_is_not_primed() -> None:
    prompt = render("chatml", first_message=True, functions=[SEARCH])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert first_message_prefix([SEARCH], first_message=True) == ""


def test_inner_thoughts_outside_kwargs_render_as_text() -> None:
    prompt = render("chatml", put_inner_thoughts_in_kwargs=False)
    assert "thinking" not in prompt
    assert (
        "<|im_start|>assistant\nUser greeted me.\n"
        '{"function": "send_message", "params": {"message": "Hello!"}}<|im_end|>\n'
    ) in prompt


def test_inner_thoughts_last() -> None:
    prompt = render("chatml", put_inner_thoughts_first=False)
    assert '"params": {"message": "Hello!", "thinking": "User greeted me."}}' in prompt
    assert "    message (string, required): Message contents.\n    thinking (string, required)" in prompt


def test_function_that_already_has_thinking_is_not_doubled() -> None:
    fn = copy.deepcopy(SEND_MESSAGE)
    fn["parameters"]["properties"] = {"thinking": {"type": "string"}, **fn["parameters"]["properties"]}
    prompt = render("chatml", functions=[fn])
    assert prompt.count("thinking (string") == 1
    # Replaced by ours, as on the OpenAI-compatible path (server.core.inner_thoughts).
    assert "thinking (string, required): Deep inner monologue private to you only." in prompt


def test_no_system_message_gets_a_system_turn_with_the_functions() -> None:
    prompt = render("chatml", messages=[{"role": "user", "content": "Hi"}], functions=[SEND_MESSAGE])
    assert prompt.startswith("<|im_start|>system\nChoose the one function below")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_no_functions_no_block() -> None:
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    prompt = render("chatml", messages=messages, functions=[])
    assert prompt == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_later_system_messages_text_parts_and_legacy_roles() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Base."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
        },
        {"role": "assistant", "content": None, "function_call": {"name": "send_message", "arguments": ""}},
        {"role": "function", "name": "send_message", "content": "None"},
        {"role": "system", "content": "Memory pressure warning."},
    ]
    prompt = render("chatml", messages=messages, functions=[])
    assert prompt == (
        "<|im_start|>system\nBase.<|im_end|>\n"
        "<|im_start|>user\npart one\npart two<|im_end|>\n"
        '<|im_start|>assistant\n{"function": "send_message", "params": {}}<|im_end|>\n'
        "<|im_start|>assistant\nFUNCTION RETURN:\nNone<|im_end|>\n"
        "<|im_start|>system\nMemory pressure warning.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_several_tool_calls_thoughts_on_the_first_only() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": "Two things.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{'y': True,}"}},
            ],
        }
    ]
    prompt = render("chatml", messages=messages, functions=[])
    assert (
        '{"function": "f", "params": {"thinking": "Two things.", "x": 1}}\n'
        '{"function": "g", "params": {"y": true}}'
    ) in prompt


def test_caller_messages_are_not_mutated() -> None:
    messages = copy.deepcopy(CONVERSATION)
    functions = copy.deepcopy(FUNCTIONS)
    render_prompt("llama3", messages, functions, first_message=True, put_inner_thoughts_in_kwargs=True)
    assert messages == CONVERSATION
    assert functions == FUNCTIONS


def test_unknown_wrapper_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        render("airoboros-l2-70b")
    assert [v.field for v in info.value.field_violations] == ["llm_config.model_wrapper"]
    assert "airoboros-l2-70b" in info.value.message


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages[0].content",
        ),
        ({"role": "critic", "content": "hm"}, "messages[0].role"),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{:"}}],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_unrenderable_messages_are_invalid_requests(message: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        render("chatml", messages=[message], functions=[])
    assert [v.field for v in info.value.field_violations] == [field]


def test_bad_function_definition_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        render("chatml", functions=[{"description": "no name"}])
    assert [v.field for v in info.value.field_violations] == ["functions[0]"]


def test_wrapper_names_and_grammar_flag() -> None:
    assert resolve_wrapper("") == "chatml"
    assert resolve_wrapper("llama3-grammar") == "llama3"
    assert wrapper_uses_grammar("chatml-grammar") is True
    assert wrapper_uses_grammar("llama3-grammar") is True
    assert wrapper_uses_grammar("chatml") is False
    assert wrapper_uses_grammar("") is False
    with pytest.raises(InvalidRequest):
        wrapper_uses_grammar("zephyr-grammar")


def test_stop_strings() -> None:
    base = ["\nUSER:", "\nASSISTANT:", "\nFUNCTION RETURN:", "<|im_start|>", "<|im_end|>", "\n### "]
    assert stop_strings("chatml") == base
    assert stop_strings("") == base
    assert stop_strings("llama3-grammar") == [*base, "<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"]
