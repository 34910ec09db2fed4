"""A fake Azure OpenAI resource: the OpenAI-compatible fake (tests/fake_upstream.py) behind
Azure's two URL forms, its `api-key` auth and its answer shapes.

- `POST /openai/deployments/{deployment}/chat/completions?api-version=V` (V required) and
  `POST /openai/v1/chat/completions` (no api-version); any other path: Azure's 404
  `{"error": {"code": "404", "message": "Resource not found"}}`.
- `api-key` must be `key` (when set): otherwise Azure's 401 body.
- Answers carry Azure's `prompt_filter_results` / `content_filter_results`; a stream starts with
  the prompt-filter chunk (`choices: []`, empty id/model) as Azure's do.
Each request is recorded (path, headers, body) and its query string in `queries`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fake_upstream import FakeUpstream, Reply, chunk, completion

DEPLOYMENT = "gpt-4o-prod"
MODEL = "gpt-4o-2024-11-20"
_SAFE = {
    name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
}


def prompt_filter_results() -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": dict(_SAFE)}]


def azure_completion(
    content: str | None = "Hello!", *, finish_reason: str = "stop", **kw: Any
) -> dict[str, Any]:
    body = completion(content, finish_reason=finish_reason, model=MODEL, **kw)
    body["prompt_filter_results"] = prompt_filter_results()
    filtered = dict(_SAFE)
    if finish_reason == "content_filter":
        filtered["violence"] = {"filtered": True, "severity": "high"}
    body["choices"][0]["content_filter_results"] = filtered
    return body


def prompt_filter_chunk() -> dict[str, Any]:
    return {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": prompt_filter_results(),
    }


def azure_stream(words: list[str], *, finish_reason: str = "stop") -> list[dict[str, Any] | str]:
    events: list[dict[str, Any] | str] = [prompt_filter_chunk(), chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in words]
    events.append(chunk({}, finish_reason=finish_reason))
    events.append(
        {
            "id": "chatcmpl-stream1",
            "object": "chat.completion.chunk",
            "created": 1732000001,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
        }
    )
    events.append("[DONE]")
    return events


def content_filter_400() -> Reply:
    return Reply(
        status=400,
        json_body={
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy. Please modify your prompt and retry.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        **_SAFE,
                        "violence": {"filtered": True, "severity": "medium"},
                        "jailbreak": {"filtered": True, "detected": True},
                    },
                },
            }
        },
    )


def context_length_400() -> Reply:
    return Reply(
        status=400,
        json_body={
            "error": {
                "message": "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 131000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )


class AzureFake(FakeUpstream):
    def __init__(self, key: str = "") -> None:
        super().__init__()
        self.key = key
        self.queries: list[str] = []
        self.default = Reply(json_body=azure_completion())

    @property
    def resource_url(self) -> str:
        """The resource's root, the deployment form's base URL (AZURE_BASE_URL)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openai/v1"

    @property
    def base_url(self) -> str:
        return self.resource_url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        deployment = path.startswith("/openai/deployments/") and path.endswith("/chat/completions")
        v1 = path == "/openai/v1/chat/completions"
        if (
            request.method != "POST"
            or not (deployment or v1)
            or (deployment and "api-version" not in request.query)
        ):
            await request.read()
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if self.key and request.headers.get("api-key") != self.key:
            await request.read()
            return web.json_response(
                {
                    "error": {
                        "code": "401",
                        "message": "Access denied due to invalid subscription key or wrong API endpoint. "
                        "Make sure to provide a valid key for an active subscription and use a correct "
                        "regional API endpoint for your resource.",
                    }
                },
                status=401,
            )
        self.queries.append(request.query_string)
        return await super()._handle(request)
