from __future__ import annotations

from typing import Any

import pytest

from server.errors import InvalidRequest, UpstreamBadResponse
from server.providers.local.endpoints import (
    DEFAULT_MAX_TOKENS,
    LocalCompletion,
    LocalRequest,
    LocalStreamChunk,
    accepts_grammar,
    auth_headers,
    build_local_request,
    extract_completion,
    parse_stream_event,
    stream_framing,
)

STOP = ["\nUSER:", "<|im_end|>"]


def build(endpoint_type: str, **kwargs: Any) -> LocalRequest:
    options: dict[str, Any] = {
        "base_url": "http://127.0.0.1:9000",
        "model": "qwen2.5:7b",
        "prompt": "PROMPT",
        "context_window": 8192,
        "max_tokens": 512,
        "grammar": None,
        "user": "user-1",
        "stop": STOP,
        "stream": False,
    }
    options.update(kwargs)
    return build_local_request(endpoint_type, **options)


@pytest.mark.parametrize(
    ("endpoint_type", "url", "body"),
    [
        (
            "ollama",
            "http://127.0.0.1:9000/api/generate",
            {
                "model": "qwen2.5:7b",
                "prompt": "PROMPT",
                "stream": False,
                "raw": True,
                "options": {"num_predict": 512, "stop": STOP, "num_ctx": 8192},
            },
        ),
        (
            "llamacpp",
            "http://127.0.0.1:9000/completion",
            {"prompt": "PROMPT", "n_predict": 512, "stop": STOP, "stream": False},
        ),
        (
            "vllm",
            "http://127.0.0.1:9000/v1/completions",
            {
                "model": "qwen2.5:7b",
                "prompt": "PROMPT",
                "max_tokens": 512,
                "stream": False,
                "user": "user-1",
                "stop": STOP,
            },
        ),
        (
            "lmstudio",
            "http://127.0.0.1:9000/v1/completions",
            {"prompt": "PROMPT", "max_tokens": 512, "stream": False, "model": "qwen2.5:7b", "stop": STOP},
        ),
        (
            "koboldcpp",
            "http://127.0.0.1:9000/api/v1/generate",
            {"prompt": "PROMPT", "max_length": 512, "stop_sequence": STOP, "max_context_length": 8192},
        ),
        (
            "webui",
            "http://127.0.0.1:9000/v1/completions",
            {"prompt": "PROMPT", "max_tokens": 512, "stop": STOP, "stream": False, "truncation_length": 8192},
        ),
    ],
)
def test_request_shapes(endpoint_type: str, url: str, body: dict[str, Any]) -> None:
    assert build(endpoint_type) == LocalRequest(url=url, body=body)


@pytest.mark.parametrize(
    ("endpoint_type", "key"), [("llamacpp", "grammar"), ("koboldcpp", "grammar"), ("webui", "grammar_string")]
)
def test_grammar_is_sent_where_accepted(endpoint_type: str, key: str) -> None:
    assert build(endpoint_type, grammar="root ::= x").body[key] == "root ::= x"
    assert accepts_grammar(endpoint_type)


@pytest.mark.parametrize("endpoint_type", ["ollama", "vllm", "lmstudio"])
def test_grammar_is_refused_elsewhere(endpoint_type: str) -> None:
    assert not accepts_grammar(endpoint_type)
    with pytest.raises(InvalidRequest) as info:
        build(endpoint_type, grammar="root ::= x")
    assert [v.field for v in info.value.field_violations] == ["llm_config.model_wrapper"]


def test_streaming_requests() -> None:
    assert build("ollama", stream=True).body["stream"] is True
    assert build("llamacpp", stream=True).body["stream"] is True
    vllm = build("vllm", stream=True)
    assert vllm.body["stream"] is True and vllm.body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in build("lmstudio", stream=True).body
    kobold = build("koboldcpp", stream=True)
    assert kobold.url == "http://127.0.0.1:9000/api/extra/generate/stream"
    assert "stream" not in kobold.body
    assert stream_framing("ollama") == "ndjson"
    assert {stream_framing(t) for t in ("llamacpp", "vllm", "lmstudio", "koboldcpp", "webui")} == {"sse"}


def test_defaults_temperature_and_context() -> None:
    assert build("vllm", max_tokens=None).body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert build("koboldcpp", max_tokens=0).body["max_length"] == DEFAULT_MAX_TOKENS
    assert build("ollama", temperature=0.2).body["options"]["temperature"] == 0.2
    assert build("llamacpp", temperature=0.0).body["temperature"] == 0.0
    assert "temperature" not in build("webui").body
    assert "num_ctx" not in build("ollama", context_window=0).body["options"]
    assert "truncation_length" not in build("webui", context_window=0).body
    assert "max_context_length" not in build("koboldcpp", context_window=0).body


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://host:8000/v1", "http://host:8000/v1/completions"),
        ("http://host:8000/v1/", "http://host:8000/v1/completions"),
        ("https://host/proxy/", "https://host/proxy/v1/completions"),
    ],
)
def test_v1_is_not_doubled(base_url: str, url: str) -> None:
    assert build("vllm", base_url=base_url).url == url


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "localhost:11434"}, "llm_config.model_endpoint"),
        ({"model": ""}, "llm_config.model"),
    ],
)
def test_bad_requests(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build("ollama", **kwargs)
    assert [v.field for v in info.value.field_violations] == [field]


def test_unknown_endpoint_type() -> None:
    with pytest.raises(InvalidRequest) as info:
        build("tgi")
    assert [v.field for v in info.value.field_violations] == ["llm_config.model_endpoint_type"]


def test_auth_headers() -> None:
    assert auth_headers("", "") == {}
    assert auth_headers("", "ignored") == {}
    assert auth_headers("bearer_token", "s3cret") == {"Authorization": "Bearer s3cret"}
    assert auth_headers("api_key", "s3cret") == {"api-key": "s3cret"}
    for bad in ("basic", "Bearer", "none"):
        with pytest.raises(InvalidRequest):
            auth_headers(bad, "s3cret")
    with pytest.raises(InvalidRequest) as info:
        auth_headers("bearer_token", "")
    assert "s3cret" not in info.value.message


@pytest.mark.parametrize(
    ("endpoint_type", "payload", "expected"),
    [
        (
            "ollama",
            {
                "model": "m",
                "response": ' "params": {}}',
                "done": True,
                "prompt_eval_count": 812,
                "eval_count": 40,
            },
            LocalCompletion(' "params": {}}', 812, 40),
        ),
        ("ollama", {"response": "x", "done": True, "eval_count": 3}, LocalCompletion("x", None, 3)),
        (
            "llamacpp",
            {
                "content": "x",
                "stop": True,
                "tokens_evaluated": 900,
                "tokens_predicted": 51,
                "timings": {"prompt_n": 12},
            },
            LocalCompletion("x", 900, 51),
        ),
        (
            "llamacpp",
            {"content": "x", "timings": {"prompt_n": 120, "predicted_n": 7}},
            LocalCompletion("x", 120, 7),
        ),
        (
            "vllm",
            {
                "choices": [{"text": "x", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 70, "completion_tokens": 9},
            },
            LocalCompletion("x", 70, 9),
        ),
        (
            "lmstudio",
            {
                "choices": [{"text": "x"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 9, "total_tokens": 9},
            },
            LocalCompletion("x", None, 9),
        ),
        ("webui", {"choices": [{"text": "x"}]}, LocalCompletion("x", None, None)),
        (
            "koboldcpp",
            {"results": [{"text": "x", "finish_reason": "stop"}]},
            LocalCompletion("x", None, None),
        ),
        (
            "vllm",
            {"choices": [{"text": ""}], "usage": {"prompt_tokens": True}},
            LocalCompletion("", None, None),
        ),
    ],
)
def test_extract_completion(endpoint_type: str, payload: dict[str, Any], expected: LocalCompletion) -> None:
    assert extract_completion(endpoint_type, payload) == expected


@pytest.mark.parametrize(
    ("endpoint_type", "payload", "field"),
    [
        ("ollama", {"done": True}, "response"),
        ("llamacpp", {"content": None}, "content"),
        ("vllm", {"choices": []}, "choices[0].text"),
        ("lmstudio", {"error": "Context length exceeded"}, "choices[0].text"),
        ("webui", {"choices": [{"message": {"content": "chat shape"}}]}, "choices[0].text"),
        ("koboldcpp", {"results": "nope"}, "results[0].text"),
    ],
)
def test_missing_text_is_upstream_bad_response(
    endpoint_type: str, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(UpstreamBadResponse) as info:
        extract_completion(endpoint_type, payload)
    assert f"`{field}`" in info.value.message
    assert info.value.metadata == {"endpoint_type": endpoint_type}
    if "error" in payload:
        assert "Context length exceeded" in info.value.message


@pytest.mark.parametrize(
    ("endpoint_type", "events", "chunks"),
    [
        (
            "ollama",
            [
                {"model": "m", "response": '"par', "done": False},
                {
                    "model": "m",
                    "response": "",
                    "done": True,
                    "done_reason": "stop",
                    "prompt_eval_count": 9,
                    "eval_count": 2,
                },
            ],
            [LocalStreamChunk('"par'), LocalStreamChunk("", True, 9, 2)],
        ),
        (
            "llamacpp",
            [
                {"content": "ams", "stop": False},
                {"content": "", "stop": True, "tokens_evaluated": 30, "tokens_predicted": 4, "timings": {}},
            ],
            [LocalStreamChunk("ams"), LocalStreamChunk("", True, 30, 4)],
        ),
        (
            "vllm",
            [
                {
                    "id": "c",
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": "x", "finish_reason": None}],
                },
                {"id": "c", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
                {"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}},
            ],
            [LocalStreamChunk("x"), LocalStreamChunk("", True), LocalStreamChunk("", False, 11, 5)],
        ),
        ("lmstudio", [{"choices": [{"text": "y", "finish_reason": None}]}], [LocalStreamChunk("y")]),
        # A "length" finish is also reported as cut by the token limit (issue 12 item 10).
        (
            "webui",
            [{"choices": [{"text": "z", "finish_reason": "length"}]}],
            [LocalStreamChunk("z", True, truncated=True)],
        ),
        (
            "koboldcpp",
            [{"token": "tok", "finish_reason": None}, {"token": "", "finish_reason": "stop"}],
            [LocalStreamChunk("tok"), LocalStreamChunk("", True)],
        ),
    ],
)
def test_stream_events(
    endpoint_type: str, events: list[dict[str, Any]], chunks: list[LocalStreamChunk]
) -> None:
    assert [parse_stream_event(endpoint_type, e) for e in events] == chunks


def test_stream_error_event() -> None:
    with pytest.raises(UpstreamBadResponse) as info:
        parse_stream_event("ollama", {"error": "model runner crashed"})
    assert "model runner crashed" in info.value.message
