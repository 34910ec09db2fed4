"""A parsed local-model answer as an OpenAI ChatCompletion JSON object."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from server.providers.local.parsing import ParsedCall


def to_chat_completion(
    parsed: ParsedCall,
    *,
    model: str,
    inner_thoughts: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    created: int | None = None,
) -> dict[str, Any]:
    """One choice: the assistant's inner thoughts as content and one tool call.

    Unknown token counts are reported as 0; callers that can count locally should pass counts.
    """
    prompt = prompt_tokens or 0
    completion = completion_tokens or 0
    return {
        "id": f"chatcmpl-local-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": inner_thoughts,
                    "tool_calls": [
                        {
                            "id": f"call_{uuid.uuid4().hex}",
                            "type": "function",
                            "function": {
                                "name": parsed.name,
                                "arguments": json.dumps(parsed.arguments, ensure_ascii=False),
                            },
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def cut_completion(
    text: str,
    *,
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    created: int | None = None,
) -> dict[str, Any]:
    """A function call the token limit cut before it was complete: the text as the model wrote it.

    No tool call is made up from it (its name or last value may be cut); `finish_reason` is
    "length" so the caller knows why, and may retry with a larger `max_tokens`.
    """
    prompt = prompt_tokens or 0
    completion = completion_tokens or 0
    return {
        "id": f"chatcmpl-local-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
