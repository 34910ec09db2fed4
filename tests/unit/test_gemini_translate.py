"""The Gemini translator, table-driven: request bodies, schemas, answers, streams, usage, errors.

Answers and stream events come from the fake's payload builders (`tests/fakes/gemini_fake.py`),
which the official SDK checks in `tests/integration/test_gemini_fake_sdk.py`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from google.protobuf import struct_pb2
from llmgateway.v1 import chat_pb2

from server.core.openai_request import build_chat_body
from server.core.retry import RetryableError
from server.core.strict_schema import to_strict_function
from server.errors import (
    ContextWindowExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RateLimitExceeded,
    UnparseableModelOutput,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)
from server.providers import gemini
from server.providers.errors import error_in_body
from tests.fakes.gemini_fake import (
    blocked_prompt,
    error_body,
    function_call,
    invalid_key,
    rate_limited,
    response,
    usage_metadata,
)

SIG = "c2lnbmF0dXJlLWJ5dGVz"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}


def body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "gemini-2.5-flash", "messages": messages, **extra}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def call(call_id: str, name: str, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
        **extra,
    }


# --------------------------------------------------------------------------------------------
# Endpoint and auth


@pytest.mark.parametrize(
    ("model", "stream", "url"),
    [
        ("gemini-2.5-flash", False, "B/models/gemini-2.5-flash:generateContent"),
        ("gemini-2.5-flash", True, "B/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
        ("models/gemini-2.5-pro", False, "B/models/gemini-2.5-pro:generateContent"),
        ("../files/x?key=1", False, "B/models/..%2Ffiles%2Fx%3Fkey%3D1:generateContent"),
    ],
)
def test_endpoint_url(model: str, stream: bool, url: str) -> None:
    assert gemini.endpoint_url("B", model, stream=stream) == url


def test_the_key_goes_in_a_header_only() -> None:
    assert gemini.auth_headers("k-123") == {"x-goog-api-key": "k-123"}
    assert "k-123" not in gemini.endpoint_url(gemini.DEFAULT_BASE_URL, "m", stream=True)
    assert gemini.NAME == "google_ai"
    assert gemini.DEFAULT_BASE_URL == "https://generativelanguage.googleapis.com/v1beta"


# --------------------------------------------------------------------------------------------
# Messages

MESSAGE_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    (
        "system and developer go to systemInstruction, in order",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            user("Hi"),
        ],
        {
            "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use metric."}]},
            "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        },
    ),
    (
        "adjacent same-role turns merge so user/model alternate",
        [user("a"), user("b"), {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}],
        {
            "contents": [
                {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                {"role": "model", "parts": [{"text": "c"}, {"text": "d"}]},
            ]
        },
    ),
    (
        "tool calls and their results: functionCall parts, then one user turn of functionResponses",
        [
            user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("call_0", "get_weather", {"city": "Paris"}, thought_signature=SIG),
                    call("call_1", "get_time", {"city": "Rome"}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
            {"role": "tool", "tool_call_id": "call_1", "content": "[1, 2]"},
        ],
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
                {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                            "thoughtSignature": SIG,
                        },
                        {"functionCall": {"name": "get_time", "args": {"city": "Rome"}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                        {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
                        {"functionResponse": {"name": "get_time", "response": {"result": [1, 2]}}},
                    ],
                },
            ]
        },
    ),
    (
        "a repeated call id names the latest call's function",
        [
            {"role": "assistant", "content": None, "tool_calls": [call("call_0", "a", {})]},
            {"role": "tool", "tool_call_id": "call_0", "content": "1"},
            {"role": "assistant", "content": None, "tool_calls": [call("call_0", "b", {})]},
            {"role": "tool", "tool_call_id": "call_0", "content": "2"},
        ],
        {
            "contents": [
                {"role": "model", "parts": [{"functionCall": {"name": "a", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "a", "response": {"result": 1}}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "b", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "b", "response": {"result": 2}}}]},
            ]
        },
    ),
    (
        "a text signature from thinking_blocks goes back on the turn's last text part",
        [
            user("Hi"),
            {
                "role": "assistant",
                "content": "Hello",
                "thinking_blocks": [
                    {"type": "thinking", "thinking": "x", "signature": "anthropic"},
                    {"type": gemini.THOUGHT_SIGNATURE_BLOCK, "signature": SIG},
                ],
            },
            user("Again"),
        ],
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello", "thoughtSignature": SIG}]},
                {"role": "user", "parts": [{"text": "Again"}]},
            ]
        },
    ),
    (
        "images: data URLs inline, https URLs as fileData with a guessed MIME type",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a/cat.webp?x=1"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://cdn.example.com/img/123", "detail": "low"},
                    },
                ],
            }
        ],
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "Compare"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                        {
                            "fileData": {
                                "mimeType": "image/webp",
                                "fileUri": "https://example.com/a/cat.webp?x=1",
                            }
                        },
                        {
                            "fileData": {
                                "mimeType": "image/jpeg",
                                "fileUri": "https://cdn.example.com/img/123",
                            }
                        },
                    ],
                }
            ]
        },
    ),
]


@pytest.mark.parametrize(
    ("messages", "expected"), [c[1:] for c in MESSAGE_CASES], ids=[c[0] for c in MESSAGE_CASES]
)
def test_messages(messages: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    out = gemini.build_body(body(messages), stream=False)
    assert {k: v for k, v in out.items() if k in ("systemInstruction", "contents")} == expected


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            "image_url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,abc"}}]}],
            "image_url",
        ),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "content[0]"),
        ([{"role": "tool", "tool_call_id": "nope", "content": "1"}], "tool_call_id"),
        ([{"role": "critic", "content": "x"}], "role"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            "arguments",
        ),
    ],
)
def test_messages_gemini_cannot_take_are_invalid_argument(messages: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        gemini.build_body(body(messages), stream=False)
    assert raised.value.metadata["provider"] == "google_ai"
    assert field in raised.value.metadata["field"]
    assert raised.value.field_violations and field in raised.value.field_violations[0].field


# --------------------------------------------------------------------------------------------
# Tools and tool choice


def test_tools_become_function_declarations() -> None:
    no_args = {
        "type": "function",
        "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
    }
    out = gemini.build_body(body([user("x")], tools=[WEATHER, no_args]), stream=False)
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather of a city.",
                    "parameters": {
                        "type": "OBJECT",
                        "properties": {
                            "city": {"type": "STRING"},
                            "unit": {"type": "STRING", "enum": ["C", "F"]},
                        },
                        "required": ["city"],
                        "propertyOrdering": ["city", "unit"],
                    },
                },
                {"name": "ping"},  # Gemini refuses an OBJECT without properties
            ]
        }
    ]
    assert "toolConfig" not in out


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice(choice: object, config: dict[str, Any]) -> None:
    out = gemini.build_body(body([user("x")], tools=[WEATHER], tool_choice=choice), stream=False)
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_legacy_functions_and_function_call_translate_like_tools() -> None:
    legacy = body([user("x")], functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    out = gemini.build_body(legacy, stream=False)
    assert out["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert out["toolConfig"]["functionCallingConfig"] == {
        "mode": "ANY",
        "allowedFunctionNames": ["get_weather"],
    }


def test_an_unknown_tool_choice_is_invalid_argument() -> None:
    with pytest.raises(InvalidRequest):
        gemini.build_body(body([user("x")], tools=[WEATHER], tool_choice="sometimes"), stream=False)


# --------------------------------------------------------------------------------------------
# Schemas

SCHEMA_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "strict-form nullable type list, additionalProperties false dropped",
        {
            "type": "object",
            "properties": {"a": {"type": ["string", "null"]}},
            "required": ["a"],
            "additionalProperties": False,
        },
        {"type": "OBJECT", "properties": {"a": {"type": "STRING", "nullable": True}}, "required": ["a"]},
    ),
    (
        "several types become anyOf",
        {"type": ["string", "integer", "null"], "description": "id"},
        {
            "description": "id",
            "anyOf": [{"type": "STRING", "description": "id"}, {"type": "INTEGER", "description": "id"}],
            "nullable": True,
        },
    ),
    (
        "anyOf [X, null] is X nullable; the parent's description wins",
        {"description": "outer", "anyOf": [{"type": "integer", "description": "inner"}, {"type": "null"}]},
        {"type": "INTEGER", "description": "outer", "nullable": True},
    ),
    (
        "anyOf of objects kept",
        {"anyOf": [{"type": "object", "properties": {"x": {"type": "number"}}}, {"type": "boolean"}]},
        {"anyOf": [{"type": "OBJECT", "properties": {"x": {"type": "NUMBER"}}}, {"type": "BOOLEAN"}]},
    ),
    (
        "enum with null (strict form) becomes a nullable string enum; const a one-value enum",
        {
            "type": "object",
            "properties": {"e": {"type": ["string", "null"], "enum": ["a", None]}, "c": {"const": "x"}},
        },
        {
            "type": "OBJECT",
            "properties": {
                "e": {"type": "STRING", "enum": ["a"], "nullable": True},
                "c": {"type": "STRING", "enum": ["x"]},
            },
            "propertyOrdering": ["e", "c"],
        },
    ),
    (
        "array and numeric bounds and Gemini formats kept; annotations dropped",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "integer", "minimum": 0, "maximum": 9, "format": "int64", "examples": [1]},
            "$comment": "c",
        },
        {
            "type": "ARRAY",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "INTEGER", "minimum": 0, "maximum": 9, "format": "int64"},
        },
    ),
    (
        "a string format Gemini does not act on is dropped (an annotation in JSON Schema)",
        {"type": "string", "format": "email", "minLength": 3, "pattern": "^.+@.+$"},
        {"type": "STRING", "minLength": 3, "pattern": "^.+@.+$"},
    ),
    (
        "local $ref to $defs is inlined; the use's description wins over the definition's",
        {
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/Point", "description": "where"}},
            "$defs": {
                "Point": {
                    "type": "object",
                    "description": "a point",
                    "properties": {"x": {"type": "number"}},
                    "required": ["x"],
                }
            },
        },
        {
            "type": "OBJECT",
            "properties": {
                "p": {
                    "type": "OBJECT",
                    "description": "where",
                    "properties": {"x": {"type": "NUMBER"}},
                    "required": ["x"],
                }
            },
        },
    ),
    (
        "OpenAPI nullable, title, default and propertyOrdering pass through",
        {
            "type": "object",
            "title": "T",
            "properties": {
                "b": {"type": "boolean", "nullable": True, "default": False},
                "a": {"type": "string"},
            },
            "propertyOrdering": ["a", "b"],
        },
        {
            "type": "OBJECT",
            "title": "T",
            "propertyOrdering": ["a", "b"],
            "properties": {
                "b": {"type": "BOOLEAN", "nullable": True, "default": False},
                "a": {"type": "STRING"},
            },
        },
    ),
]


@pytest.mark.parametrize(
    ("schema", "expected"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_conversion(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert gemini.convert_schema(schema, "f") == expected


REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "oneOf", "/properties/a"),
    (
        {"type": "object", "properties": {"a": {"type": "string"}}, "patternProperties": {"^x": {}}},
        "patternProperties",
        "/",
    ),
    ({"type": "object", "properties": {"a": {"$ref": "#/components/A"}}}, "$ref", "/properties/a"),
    (
        {
            "type": "object",
            "properties": {"n": {"$ref": "#/$defs/N"}},
            "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
        },
        "$ref",
        "/properties/n/properties/next",
    ),
    ({"type": "object", "properties": {"a": {"const": 3}}}, "const", "/properties/a"),
    ({"type": "object", "properties": {"a": {"type": "integer", "enum": [1, 2]}}}, "enum", "/properties/a"),
    (
        {
            "type": "object",
            "properties": {"m": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "additionalProperties",
        "/properties/m",
    ),
    ({"type": "object", "properties": {"m": {"type": "object"}}}, "properties", "/properties/m"),
    (
        {"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}},
        "exclusiveMinimum",
        "/properties/a",
    ),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "array", "uniqueItems": True, "items": {"type": "string"}}},
        },
        "uniqueItems",
        "/properties/a",
    ),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "schema", "/properties/a/items"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type", "/properties/a/type"),
]


@pytest.mark.parametrize(("parameters", "keyword", "where"), REFUSED)
def test_schema_keywords_gemini_cannot_take_are_invalid_argument(
    parameters: dict[str, Any], keyword: str, where: str
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with pytest.raises(InvalidRequest) as raised:
        gemini.build_body(body([user("x")], tools=[tool]), stream=False)
    error = raised.value
    assert error.metadata["keyword"] == keyword
    assert error.metadata["schema_path"] == where
    assert error.metadata["field"] == "tools[0].function.parameters"
    assert error.metadata["provider"] == "google_ai"
    assert keyword in error.message and where in error.message
    (violation,) = error.field_violations
    assert violation.field.startswith("tools[0].function.parameters")


def test_the_gateways_own_strict_form_converts_without_refusal() -> None:
    # What build_chat_body sends when a tool goes out in strict form.
    function = {
        "name": "plan",
        "parameters": {
            "type": "object",
            "properties": {
                "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}},
                "note": {"type": "string"},
                "level": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
            "required": ["steps"],
            "$defs": {
                "Step": {"type": "object", "properties": {"do": {"type": "string"}}, "required": ["do"]}
            },
        },
    }
    strict = to_strict_function(function)
    converted = gemini.convert_schema(strict["parameters"], "f")
    assert converted["properties"]["note"] == {"type": "STRING", "nullable": True}
    assert converted["properties"]["steps"]["items"]["properties"] == {"do": {"type": "STRING"}}
    assert converted["properties"]["level"]["anyOf"][0] == {"type": "INTEGER"}
    assert converted["required"] == ["steps", "note", "level"]


# --------------------------------------------------------------------------------------------
# Generation parameters


def test_generation_parameters() -> None:
    out, dropped = gemini.build_body_with_notes(
        body(
            [user("x")],
            max_completion_tokens=256,
            temperature=0.2,
            top_p=0.9,
            stop=["END", "STOP"],
            seed=7,
            frequency_penalty=0.5,
            presence_penalty=-0.5,
            user="u-1",
            parallel_tool_calls=False,
            stream=True,
            stream_options={"include_usage": True},
        ),
        stream=True,
    )
    assert out["generationConfig"] == {
        "candidateCount": 1,
        "maxOutputTokens": 256,
        "temperature": 0.2,
        "topP": 0.9,
        "stopSequences": ["END", "STOP"],
        "seed": 7,
        "frequencyPenalty": 0.5,
        "presencePenalty": -0.5,
    }
    assert dropped == ["parallel_tool_calls", "stream_options", "user"]


@pytest.mark.parametrize(
    ("extra", "config"),
    [
        ({"stop": "END"}, {"stopSequences": ["END"]}),
        ({"max_tokens": 10}, {"maxOutputTokens": 10}),
        ({"response_format": {"type": "text"}}, {}),
        ({"response_format": {"type": "json_object"}}, {"responseMimeType": "application/json"}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "r",
                        "strict": True,
                        "schema": {
                            "type": "object",
                            "properties": {"n": {"type": "integer"}},
                            "required": ["n"],
                            "additionalProperties": False,
                        },
                    },
                }
            },
            {
                "responseMimeType": "application/json",
                "responseSchema": {
                    "type": "OBJECT",
                    "properties": {"n": {"type": "INTEGER"}},
                    "required": ["n"],
                },
            },
        ),
        ({"reasoning_effort": "low"}, {"thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}),
        (
            {"reasoning_effort": "minimal"},
            {"thinkingConfig": {"thinkingBudget": 512, "includeThoughts": True}},
        ),
        (
            {"reasoning_effort": "medium"},
            {"thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True}},
        ),
        (
            {"reasoning_effort": "high"},
            {"thinkingConfig": {"thinkingBudget": 24576, "includeThoughts": True}},
        ),
        ({"reasoning_effort": "none"}, {"thinkingConfig": {"thinkingBudget": 0, "includeThoughts": False}}),
        (
            {"reasoning_effort": "high", "model": "gemini-3-pro-preview"},
            {"thinkingConfig": {"thinkingLevel": "HIGH", "includeThoughts": True}},
        ),
        (
            {"reasoning_effort": "minimal", "model": "models/gemini-3-flash-preview"},
            {"thinkingConfig": {"thinkingLevel": "MINIMAL", "includeThoughts": True}},
        ),
    ],
)
def test_generation_config_entries(extra: dict[str, Any], config: dict[str, Any]) -> None:
    out = gemini.build_body(body([user("x")], **extra), stream=False)
    assert out["generationConfig"] == {"candidateCount": 1, **config}


@pytest.mark.parametrize(
    "extra",
    [
        {"reasoning_effort": "extreme"},
        {"response_format": {"type": "yaml"}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "object", "properties": {"a": {"not": {}}}}},
            }
        },
    ],
)
def test_generation_parameters_gemini_cannot_take(extra: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        gemini.build_body(body([user("x")], **extra), stream=False)


# --------------------------------------------------------------------------------------------
# Answers


def test_text_thoughts_and_usage() -> None:
    payload = response(
        [
            {"text": "Let me think.", "thought": True},
            {"text": "Hello"},
            {"text": " world", "thoughtSignature": SIG},
        ],
        usage=usage_metadata(100, 5, thoughts=20, cached=60),
    )
    completion = gemini.parse_completion(payload, model="gemini-2.5-flash")
    assert completion["object"] == "chat.completion"
    assert completion["id"] == "resp-fake-1"
    assert completion["model"] == "gemini-2.5-flash"
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello world",
        "reasoning_content": "Let me think.",
        "thinking_blocks": [{"type": gemini.THOUGHT_SIGNATURE_BLOCK, "signature": SIG}],
    }
    assert completion["usage"] == {
        "prompt_tokens": 100,  # promptTokenCount already includes the 60 cached
        "completion_tokens": 25,  # candidates + thoughts, as OpenAI counts reasoning
        "total_tokens": 125,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }


def test_function_calls_with_ids_and_signatures() -> None:
    parts = [
        function_call("get_weather", {"city": "Paris"}, signature=SIG),
        {"functionCall": {"name": "get_time", "args": {}, "id": "gem-7"}},
    ]
    completion = gemini.parse_completion(response(parts), model="m")
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            "thought_signature": SIG,
        },
        {"id": "gem-7", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


def test_the_signature_goes_back_on_the_next_turn() -> None:
    first = gemini.parse_completion(response([function_call("f", {"a": 1}, signature=SIG)]), model="m")
    message = first["choices"][0]["message"]
    call_id = message["tool_calls"][0]["id"]
    history = [user("go"), message, {"role": "tool", "tool_call_id": call_id, "content": '{"ok": true}'}]
    sent = gemini.build_body(body(history), stream=False)
    assert sent["contents"][1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": SIG}],
    }
    assert sent["contents"][2]["parts"] == [{"functionResponse": {"name": "f", "response": {"ok": True}}}]


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish: str) -> None:
    completion = gemini.parse_completion(response([{"text": "x"}], finish_reason=reason), model="m")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == finish
    assert ("refusal" in choice["message"]) is (finish == "content_filter")


def test_a_safety_stop_without_content_is_content_filter_with_the_reason() -> None:
    payload = response([], finish_reason="SAFETY")
    payload["candidates"][0].pop("content")
    choice = gemini.parse_completion(payload, model="m")["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] is None
    assert "SAFETY" in choice["message"]["refusal"]


def test_a_blocked_prompt_is_content_filter_never_an_empty_stop() -> None:
    completion = gemini.parse_completion(blocked_prompt("PROHIBITED_CONTENT"), model="m")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "PROHIBITED_CONTENT" in choice["message"]["refusal"]
    assert completion["usage"]["prompt_tokens"] == 9


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"usageMetadata": {}}, UpstreamBadResponse),
        ({"candidates": "x"}, UpstreamBadResponse),
        (response([], finish_reason="STOP"), UpstreamBadResponse),
        (response([{"text": ""}], finish_reason="STOP"), UpstreamBadResponse),
        (response([{"text": ""}], finish_reason="MALFORMED_FUNCTION_CALL"), UnparseableModelOutput),
        (response([], finish_reason="MISSING_THOUGHT_SIGNATURE"), UpstreamRejected),
        (response([{"functionCall": {"args": {}}}]), UpstreamBadResponse),
    ],
)
def test_unreadable_answers(payload: dict[str, Any], error: type[GatewayError]) -> None:
    with pytest.raises(error) as raised:
        gemini.parse_completion(payload, model="m")
    assert raised.value.metadata["provider"] == "google_ai"


def test_usage_counts_tool_use_prompt_tokens_and_fills_a_missing_total() -> None:
    assert gemini.usage(
        {"promptTokenCount": 10, "toolUsePromptTokenCount": 4, "candidatesTokenCount": 2}
    ) == {
        "prompt_tokens": 14,
        "completion_tokens": 2,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# --------------------------------------------------------------------------------------------
# Streams


def decode(events: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    decoder = gemini.StreamDecoder(model="gemini-2.5-flash")
    chunks: list[dict[str, Any] | None] = []
    for event in events:
        chunks.extend(decoder.feed(None, orjson.dumps(event)))
    return chunks + decoder.finish()


def deltas(chunks: list[dict[str, Any] | None]) -> list[tuple[dict[str, Any], str | None]]:
    return [
        (c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks if c and c["choices"]
    ]


def test_stream_of_thoughts_then_text() -> None:
    chunks = decode(
        [
            response([{"text": "Hmm", "thought": True}], finish_reason=None, usage=usage_metadata(8, 0)),
            response([{"text": "Hel"}], finish_reason=None, usage=usage_metadata(8, 1)),
            response([{"text": "lo", "thoughtSignature": SIG}], usage=usage_metadata(8, 2, thoughts=3)),
        ]
    )
    assert deltas(chunks) == [
        ({"role": "assistant", "reasoning_content": "Hmm"}, None),
        ({"content": "Hel"}, None),
        (
            {
                "content": "lo",
                "thinking_blocks": [{"type": gemini.THOUGHT_SIGNATURE_BLOCK, "signature": SIG}],
            },
            None,
        ),
        ({}, "stop"),
    ]
    usage_chunk = chunks[-2]
    assert usage_chunk is not None and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert usage_chunk["object"] == "chat.completion.chunk" and usage_chunk["id"] == "resp-fake-1"
    assert chunks[-1] is None


def test_stream_of_whole_function_calls_each_with_its_index() -> None:
    chunks = decode(
        [
            response([function_call("a", {"x": 1}, signature=SIG)], finish_reason=None),
            response([function_call("b", {}), function_call("c", {"y": [1]})]),
        ]
    )
    calls = [tc for delta, _ in deltas(chunks) for tc in delta.get("tool_calls", [])]
    assert [(tc["index"], tc["id"], tc["function"]["name"], tc["function"]["arguments"]) for tc in calls] == [
        (0, "call_0", "a", '{"x":1}'),
        (1, "call_1", "b", "{}"),
        (2, "call_2", "c", '{"y":[1]}'),
    ]
    assert calls[0]["thought_signature"] == SIG
    assert deltas(chunks)[-1] == ({}, "tool_calls")


def test_stream_of_a_blocked_prompt() -> None:
    chunks = decode([blocked_prompt("SAFETY")])
    ((delta, finish),) = deltas(chunks)
    assert finish == "content_filter"
    assert "SAFETY" in delta["refusal"]
    assert chunks[-1] is None


def test_stream_safety_stop_and_max_tokens() -> None:
    assert deltas(decode([response([{"text": "a"}], finish_reason="SAFETY")]))[-1][1] == "content_filter"
    assert deltas(decode([response([{"text": "a"}], finish_reason="MAX_TOKENS")]))[-1][1] == "length"


def test_an_empty_stop_in_a_stream_is_an_error() -> None:
    decoder = gemini.StreamDecoder()
    decoder.feed(None, orjson.dumps(response([{"text": ""}], finish_reason=None)))
    with pytest.raises(UpstreamBadResponse):
        decoder.feed(None, orjson.dumps(response([{"text": "", "thoughtSignature": SIG}])))


def test_a_stream_that_ends_before_a_finish_reason_is_an_error_not_a_short_answer() -> None:
    decoder = gemini.StreamDecoder()
    decoder.feed(None, orjson.dumps(response([{"text": "Hel"}], finish_reason=None)))
    with pytest.raises(UpstreamBadResponse):
        decoder.finish()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (orjson.dumps(error_body(429, "Resource has been exhausted")), RateLimitExceeded),
        (orjson.dumps(error_body(503, "The model is overloaded.")), UpstreamUnavailable),
        (b"not json", UpstreamBadResponse),
        (b"[1]", UpstreamBadResponse),
    ],
)
def test_stream_errors_after_the_200(data: bytes, error: type[GatewayError]) -> None:
    with pytest.raises(error) as raised:
        gemini.StreamDecoder(scrub=lambda s: s.replace("exhausted", "x")).feed(None, data)
    assert raised.value.metadata["provider"] == "google_ai"


def test_a_429_event_in_a_stream_keeps_googles_retry_delay() -> None:
    # Mapped as Gemini's own 429 answer: its RetryInfo (13 s) is the caller's RetryInfo and the
    # routing cooldown (it used to be the generic in-body mapping's default second).
    decoder = gemini.StreamDecoder(scrub=scrub)
    decoder.feed(None, orjson.dumps(response([{"text": "Half"}], finish_reason=None)))
    with pytest.raises(RateLimitExceeded) as raised:
        decoder.feed(None, orjson.dumps(rate_limited("13s")))
    error = raised.value
    assert error.retry_delay == pytest.approx(13.0)
    assert error.metadata["http_status"] == "200" and error.metadata["upstream_code"] == "429"
    assert error.metadata["upstream_status"] == "RESOURCE_EXHAUSTED"
    assert "HTTP 200, then an error event (code 429)" in error.message


def test_a_404_event_in_a_stream_is_not_a_base_url_to_check() -> None:
    # The 200 came from the generateContent path: a 404 after it is no wrong base URL.
    data = orjson.dumps({"error": {"code": 404, "message": "Requested entity was not found."}})
    with pytest.raises(GatewayError) as raised:
        gemini.StreamDecoder(scrub=scrub).feed(None, data)
    error = raised.value
    assert "base URL" not in error.message and "hint" not in error.metadata
    assert "HTTP 200, then an error event (code 404): Requested entity was not found." in error.message


def test_a_429_event_with_its_code_as_a_string_keeps_googles_retry_delay() -> None:
    payload = rate_limited("13s")
    payload["error"]["code"] = "429"
    with pytest.raises(RateLimitExceeded) as raised:
        gemini.StreamDecoder(scrub=scrub).feed(None, orjson.dumps(payload))
    assert raised.value.retry_delay == pytest.approx(13.0)
    assert raised.value.metadata["upstream_status"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("code", ["\u00b2", "\u0664\u0662\u0669"])  # str.isdigit, but not ASCII digits
def test_an_error_code_of_unicode_digits_is_no_code(code: str) -> None:
    # int("\u00b2") raises ValueError: it escaped as an unexpected error instead of the mapping.
    data = orjson.dumps({"error": {"code": code, "message": "x"}})
    with pytest.raises(UpstreamBadResponse):
        gemini.StreamDecoder().feed(None, data)
    generic = error_in_body(orjson.loads(data), provider="openrouter", scrub=str)
    assert isinstance(generic, UpstreamBadResponse)


def test_an_error_key_of_null_next_to_candidates_is_a_normal_chunk() -> None:
    # Some proxies put `"error": null` in every event: the key's presence alone raised, so a
    # good answer's first chunk came back as an error.
    chunks = decode(
        [
            {**response([{"text": "Hel"}], finish_reason=None), "error": None},
            {**response([{"text": "lo"}]), "error": None},
        ]
    )
    assert "".join(d.get("content") or "" for d, _ in deltas(chunks)) == "Hello"
    assert deltas(chunks)[-1][1] == "stop"
    with pytest.raises(RateLimitExceeded):  # an error with a value next to candidates still is one
        decode([{**response([{"text": "Hel"}], finish_reason=None), **error_body(429, "exhausted")}])


@pytest.mark.parametrize("empty", [{}, "", 0, False, []])
def test_an_empty_error_next_to_candidates_is_a_normal_chunk(empty: object) -> None:
    # As null: no error said, as the OpenAI-compatible stream reads it (only a value is one).
    chunks = decode(
        [
            {**response([{"text": "Hel"}], finish_reason=None), "error": empty},
            {**response([{"text": "lo"}]), "error": empty},
        ]
    )
    assert "".join(d.get("content") or "" for d, _ in deltas(chunks)) == "Hello"
    assert deltas(chunks)[-1][1] == "stop"


def test_an_error_event_without_a_numeric_code_is_still_an_error() -> None:
    data = orjson.dumps({"error": {"code": "BUSY", "message": "later", "status": "UNAVAILABLE"}})
    with pytest.raises(UpstreamBadResponse):
        gemini.StreamDecoder().feed(None, data)


THOUGHT_ONLY = [{"text": "Let me think about it.", "thought": True}]


def test_only_thoughts_and_stop_is_no_answer_unary() -> None:
    # The agent would get empty content marked complete: as an empty candidate, an error.
    with pytest.raises(UpstreamBadResponse, match="only thoughts") as raised:
        gemini.parse_completion(response(THOUGHT_ONLY), model="m")
    # The same cause as the OpenAI-compatible path's reasoning-only answer (server.core.reasoning_only).
    assert raised.value.metadata["cause"] == "reasoning_only"
    assert raised.value.metadata["reasoning_chars"] == str(len(THOUGHT_ONLY[0]["text"]))
    thought_then_text = gemini.parse_completion(response([*THOUGHT_ONLY, {"text": "Yes."}]), model="m")
    assert thought_then_text["choices"][0]["message"]["content"] == "Yes."
    length = gemini.parse_completion(response(THOUGHT_ONLY, finish_reason="MAX_TOKENS"), model="m")
    assert length["choices"][0]["finish_reason"] == "length"  # cut while thinking: said so, kept


def test_only_thoughts_and_stop_is_no_answer_stream() -> None:
    decoder = gemini.StreamDecoder()
    decoder.feed(None, orjson.dumps(response(THOUGHT_ONLY, finish_reason=None)))
    with pytest.raises(UpstreamBadResponse, match="only thoughts") as raised:
        decoder.feed(None, orjson.dumps(response([{"text": "", "thoughtSignature": SIG}])))
    assert raised.value.metadata["cause"] == "reasoning_only"
    assert raised.value.metadata["reasoning_chars"] == str(len(THOUGHT_ONLY[0]["text"]))
    ok = decode([response(THOUGHT_ONLY, finish_reason=None), response([{"text": "Yes."}])])
    assert "".join(d.get("content") or "" for d, _ in deltas(ok)) == "Yes."
    assert deltas(ok)[-1][1] == "stop"


# --------------------------------------------------------------------------------------------
# Errors


def scrub(text: str) -> str:
    return text.replace("AIzaSECRET", "[redacted]")


def classify(
    status: int, payload: object, headers: dict[str, str] | None = None
) -> RetryableError | GatewayError:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return gemini.error_for_status(status, raw, headers or {}, scrub=scrub)


TOO_LONG = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."


@pytest.mark.parametrize(
    ("status", "payload", "kind", "retryable"),
    [
        (400, error_body(400, TOO_LONG), ContextWindowExceeded, False),
        (400, invalid_key(), UpstreamAuthFailed, False),
        (400, error_body(400, "Invalid JSON payload received."), UpstreamRejected, False),
        (401, error_body(401, "Request had invalid authentication credentials."), UpstreamAuthFailed, False),
        (403, error_body(403, "Permission denied."), UpstreamAuthFailed, False),
        # The caller's image URL names a Files API file of another project (or an expired one):
        # the request's fault. As AUTH_FAILED, routing disabled the server's key until a reload.
        (
            403,
            error_body(403, "You do not have permission to access the File abc123 or it may not exist."),
            UpstreamRejected,
            False,
        ),
        (404, error_body(404, "models/gemini-9 is not found for API version v1beta"), ModelNotFound, False),
        (404, b"<html><title>Error 404 (Not Found)!!1</title></html>", NotFound, False),
        (429, rate_limited("13s"), RateLimitExceeded, True),
        (500, error_body(500, "An internal error has occurred."), UpstreamUnavailable, True),
        (503, error_body(503, "The model is overloaded."), UpstreamUnavailable, True),
        (504, error_body(504, "Deadline expired."), UpstreamUnavailable, True),
    ],
)
def test_error_table(status: int, payload: object, kind: type[GatewayError], retryable: bool) -> None:
    mapped = classify(status, payload)
    assert isinstance(mapped, RetryableError) is retryable
    error = mapped.error if isinstance(mapped, RetryableError) else mapped
    assert isinstance(error, kind)
    assert error.metadata["provider"] == "google_ai"
    assert error.metadata["http_status"] == str(status)


def test_retry_info_is_the_retry_hint() -> None:
    mapped = classify(429, rate_limited("13.5s"))
    assert isinstance(mapped, RetryableError)
    assert mapped.retry_after == 13.5 and mapped.status == 429
    assert mapped.error.retry_delay == 13.5
    assert mapped.error.metadata["upstream_status"] == "RESOURCE_EXHAUSTED"


def test_retry_after_header_stands_in_for_a_missing_retry_info() -> None:
    mapped = classify(503, error_body(503, "overloaded"), {"Retry-After": "4"})
    assert isinstance(mapped, RetryableError) and mapped.retry_after == 4.0
    bare = classify(429, error_body(429, "quota"))
    assert isinstance(bare, RetryableError) and bare.retry_after is None and bare.error.retry_delay == 1.0


def test_error_messages_are_scrubbed_and_name_google_status() -> None:
    mapped = classify(400, error_body(400, "bad key AIzaSECRET"))
    assert isinstance(mapped, UpstreamRejected)
    assert "AIzaSECRET" not in mapped.message and "[redacted]" in mapped.message
    assert mapped.metadata["upstream_status"] == "INVALID_ARGUMENT"
    key_error = classify(400, invalid_key())
    assert isinstance(key_error, UpstreamAuthFailed)
    assert key_error.metadata["upstream_reason"] == "API_KEY_INVALID"


def test_a_context_window_error_says_maximum_context_length() -> None:
    error = classify(400, error_body(400, TOO_LONG))
    assert isinstance(error, ContextWindowExceeded)
    assert "maximum context length" in error.message


def test_the_body_the_gateway_builds_today_translates() -> None:
    parameters = struct_pb2.Struct()
    parameters.update(WEATHER["function"]["parameters"])
    request = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(model="gemini-2.5-flash", max_tokens=100, reasoning_effort="low"),
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="Be brief."),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Weather?"),
            chat_pb2.Message(
                role=chat_pb2.ROLE_ASSISTANT,
                tool_calls=[
                    chat_pb2.ToolCall(id="call_0", name="get_weather", arguments='{"city": "Paris"}')
                ],
            ),
            chat_pb2.Message(role=chat_pb2.ROLE_TOOL, tool_call_id="call_0", content="21C"),
        ],
        functions=[chat_pb2.FunctionDefinition(name="get_weather", description="w", parameters=parameters)],
        function_call="required",
        user_id="u-1",
    )
    openai_body = build_chat_body(request, stream=True, endpoint=gemini.DEFAULT_BASE_URL)

    out, dropped = gemini.build_body_with_notes(openai_body, stream=True)

    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [turn["role"] for turn in out["contents"]] == ["user", "model", "user"]
    assert out["contents"][2]["parts"][0]["functionResponse"] == {
        "name": "get_weather",
        "response": {"result": "21C"},
    }
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert out["generationConfig"]["maxOutputTokens"] == 100
    assert out["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}
    assert "user" in dropped
