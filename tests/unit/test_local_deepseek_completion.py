from __future__ import annotations

import copy
import json
import re
from typing import Any

from server.providers.local.completion import to_chat_completion
from server.providers.local.deepseek import (
    ANSWER_INSTRUCTION,
    functions_block,
    is_deepseek_r1,
    with_functions_in_system_prompt,
)
from server.providers.local.parsing import ParsedCall, parse_function_call

FUNCTIONS: list[dict[str, Any]] = [
    {
        "name": "send_message",
        "description": "Sends a message.",
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        },
    },
    {"type": "function", "function": {"name": "ping", "description": "Ping."}},
]


def test_is_deepseek_r1() -> None:
    assert is_deepseek_r1("DeepSeek-R1-Distill-Qwen-7B")
    assert is_deepseek_r1("deepseek-r1:14b")
    assert not is_deepseek_r1("deepseek-v3")
    assert not is_deepseek_r1("qwen2.5")


def test_functions_block() -> None:
    block = functions_block(FUNCTIONS)
    lines = block.splitlines()
    assert lines[0] == "<available functions>"
    assert json.loads(lines[1])["name"] == "send_message"
    assert json.loads(lines[2]) == {"name": "ping", "description": "Ping.", "parameters": {}}
    assert lines[3] == "</available functions>"
    assert lines[4] == ANSWER_INSTRUCTION
    assert '"function"' in ANSWER_INSTRUCTION and '"params"' in ANSWER_INSTRUCTION


def test_system_message_extended_on_a_copy() -> None:
    messages = [{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "Hi"}]
    original = copy.deepcopy(messages)
    out = with_functions_in_system_prompt(messages, FUNCTIONS)
    assert messages == original
    assert out is not messages and out[0] is not messages[0]
    assert out[0]["content"] == "You are Sam.\n\n" + functions_block(FUNCTIONS)
    assert out[1] == messages[1]


def test_content_parts_get_a_new_part() -> None:
    messages: list[dict[str, Any]] = [{"role": "developer", "content": [{"type": "text", "text": "Base."}]}]
    original = copy.deepcopy(messages)
    out = with_functions_in_system_prompt(messages, FUNCTIONS)
    assert messages == original
    assert out[0]["content"] == [
        {"type": "text", "text": "Base."},
        {"type": "text", "text": functions_block(FUNCTIONS)},
    ]


def test_no_system_message_inserts_one() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    out = with_functions_in_system_prompt(messages, FUNCTIONS)
    assert out == [
        {"role": "system", "content": functions_block(FUNCTIONS)},
        {"role": "user", "content": "Hi"},
    ]
    assert messages == [{"role": "user", "content": "Hi"}]


def test_no_functions_no_crash_no_change() -> None:
    messages = [{"role": "system", "content": "You are Sam."}]
    out = with_functions_in_system_prompt(messages, [])
    assert out == messages and out is not messages
    assert with_functions_in_system_prompt([], []) == []
    assert with_functions_in_system_prompt([], FUNCTIONS)[0]["role"] == "system"


def test_to_chat_completion() -> None:
    parsed = ParsedCall("send_message", {"message": "Héllo"}, "Greet.")
    out = to_chat_completion(
        parsed, model="qwen", inner_thoughts="Greet.", prompt_tokens=10, completion_tokens=4
    )
    assert re.fullmatch(r"chatcmpl-local-[0-9a-f-]{36}", out["id"])
    assert out["object"] == "chat.completion" and out["model"] == "qwen" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == "Greet."
    (call,) = message["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]{32}", call["id"])
    assert call["type"] == "function"
    assert call["function"]["name"] == "send_message"
    assert json.loads(call["function"]["arguments"]) == {"message": "Héllo"}
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_to_chat_completion_unknown_usage_and_no_thoughts() -> None:
    out = to_chat_completion(
        ParsedCall("ping"), model="m", inner_thoughts=None, prompt_tokens=None, completion_tokens=3, created=7
    )
    assert out["created"] == 7
    assert out["choices"][0]["message"]["content"] is None
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}
    other = to_chat_completion(
        ParsedCall("ping"), model="m", inner_thoughts=None, prompt_tokens=1, completion_tokens=1
    )
    assert other["id"] != out["id"]


def test_end_to_end_parse_then_completion() -> None:
    parsed = parse_function_call(
        ' "params": {"thinking": "Hi back.", "message": "Hey!"},}',
        primed_prefix='{"function": "send_message",',
    )
    out = to_chat_completion(
        parsed, model="m", inner_thoughts=parsed.inner_thoughts, prompt_tokens=1, completion_tokens=1
    )
    message = out["choices"][0]["message"]
    assert message["content"] == "Hi back."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"message": "Hey!"}
