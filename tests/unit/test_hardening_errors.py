"""Issue 12 item 12: a 404 says whether the model or the path is unknown (error_for_status);
and which field of an error body is the provider's message (upstream_message)."""

from __future__ import annotations

import orjson
import pytest

from server.errors import ModelNotFound, NotFound, UpstreamRejected
from server.providers.errors import error_for_status, upstream_message


def _error(body: bytes, provider: str = "openai") -> object:
    return error_for_status(404, body, {}, provider=provider, scrub=lambda s: s)


@pytest.mark.parametrize(
    "body",
    [
        b"404: Not Found",  # aiohttp
        b"404 page not found",  # Go's mux (Ollama)
        orjson.dumps({"detail": "Not Found"}),  # FastAPI (vLLM)
        orjson.dumps(
            {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
        ),  # llama.cpp
        b"",
        b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>nginx</body></html>",
    ],
)
def test_a_bare_404_is_an_endpoint_not_found_with_a_hint(body: bytes) -> None:
    error = _error(body)
    assert isinstance(error, NotFound)
    assert (error.reason, error.metadata["not_found"], error.metadata["http_status"]) == (
        "NOT_FOUND",
        "endpoint",
        "404",
    )
    assert "ends with /v1" in error.metadata["hint"] and error.metadata["hint"] in error.message


def test_a_local_server_type_gets_the_root_hint() -> None:
    # ollama/llamacpp/koboldcpp types take the server's root; their paths are added by the gateway.
    error = _error(b"404 page not found", provider="ollama")
    assert isinstance(error, NotFound)
    assert "root" in error.metadata["hint"] and "/v1" in error.metadata["hint"]


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"error": {"message": "no such thing", "code": "model_not_found"}}),
        orjson.dumps({"error": 'model "qwen" not found, try pulling it first'}),
        orjson.dumps(
            {"error": {"message": "No endpoints found matching your data policy"}}
        ),  # a real message
    ],
)
def test_a_404_that_says_something_else_stays_model_not_found(body: bytes) -> None:
    error = _error(body)
    assert isinstance(error, ModelNotFound)
    assert error.metadata["not_found"] == "model"
    assert "hint" not in error.metadata


# upstream_message: which field of an error body is the provider's message.


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"error": None, "detail": "Model qwen is not served here"}, "Model qwen is not served here"),
        ({"error": None, "message": "Model qwen is not served here"}, "Model qwen is not served here"),
        (
            {"error": None, "detail": None, "message": "Model qwen is not served here"},
            "Model qwen is not served here",
        ),
        ({"error": {"message": "from error"}, "detail": "from detail"}, "from error"),
        ({"detail": "from detail", "message": "from message"}, "from detail"),
        # A flag, a number or an empty value says nothing either (`{"error": true, "message": ...}`
        # is a common shape): the message was "True", "404", "{}" or the whole body.
        ({"error": True, "message": "Invalid API key"}, "Invalid API key"),
        ({"error": False, "detail": "Model qwen is not served here"}, "Model qwen is not served here"),
        ({"error": 404, "message": "no such model"}, "no such model"),
        ({"error": {}, "message": "from message"}, "from message"),
        ({"error": "", "detail": "from detail"}, "from detail"),
        ({"error": " ", "detail": [], "message": "from message"}, "from message"),
    ],
)
def test_upstream_message_reads_the_first_field_with_a_value(
    payload: dict[str, object], message: str
) -> None:
    # `"error": null` ended the look-up: the message was the whole JSON body, nulls and all.
    assert upstream_message(orjson.dumps(payload)) == message
    error = error_for_status(400, orjson.dumps(payload), {}, provider="openai", scrub=lambda s: s)
    assert isinstance(error, UpstreamRejected)
    assert error.message == f"openai answered HTTP 400: {message}"
