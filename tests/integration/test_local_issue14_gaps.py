"""Issue 14's last test gaps, through the real gRPC server and real loopback servers.

1. `LLMGW_LOCAL_EXACT_TOKENS` against fakes of vLLM's and llama.cpp's `/tokenize` that record what
   they receive: the guard uses the server's count, the prefix cache (per organization), the
   fallbacks to tiktoken (404, a hung server, garbage, hostile counts), and /tokenize going only
   to the call's own target under the same endpoint policy.
2. A BYOK key echoed back in a 4xx or 5xx error body (plain, bare, URL-encoded, JSON-escaped,
   straddling the cuts) reaches no trace, error or log.
3. Unique ids of local answers under concurrency; the server's token counts kept in the trace of
   an unparseable local answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from aiohttp import web
from google.protobuf import json_format
from llmgateway.v1 import chat_pb2, providers_pb2

import server.auth.resolver as resolver_module
from server.providers import errors as provider_errors
from server.providers.local import exact_count
from tests.gateway_harness import RunningGateway, make_settings, running_gateway
from tests.integration.test_hardening_ssrf_e2e import loopback_lookup
from tests.integration.test_local_servers import error_details, local_request, trace_of
from tests.integration.test_security_e2e import ByteSink, bearer, error_texts, make_key
from tests.local_fakes import Answer, LocalServer

SYSTEM = "You are Sam, a helpful companion who remembers everything the user tells you."
STEP_1 = [
    chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=SYSTEM),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="My birthday is on the fourth of May."),
]
STEP_2 = [
    *STEP_1,
    chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, content="Noted, the fourth of May."),
    chat_pb2.Message(role=chat_pb2.ROLE_USER, content="When is it again?"),
]


# -- a local server with a /tokenize ----------------------------------------------------------------


@dataclass
class Tokenized:
    text: str
    first: bool  # add_special / add_special_tokens
    body: dict[str, Any]
    headers: dict[str, str]


def fake_count(text: str, first: bool) -> int:
    """The fake tokenizer: one token per character, plus a BOS at the prompt's start (additive
    over cuts, as the real tokenizers are at special tokens)."""
    return len(text) + (1 if first else 0)


@dataclass
class TokenizingServer(LocalServer):
    """tests.local_fakes' llamacpp or vllm server with that server's `/tokenize` (at the root).

    `tokenize_reply` (set by a test) replaces the honest answer: a (status, JSON body or raw bytes)
    pair, or "hang" (never answers)."""

    tokenized: list[Tokenized] = field(default_factory=list)
    tokenize_problems: list[str] = field(default_factory=list)
    tokenize_reply: tuple[int, Any] | str | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/tokenize"):
            return await self._tokenize(request)
        return await super()._handle(request)

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.path != "/tokenize":
            self.tokenize_problems.append(f"/tokenize asked at {request.path}")
        if self.kind == "vllm":
            expected = {"model", "prompt", "add_special_tokens"}
            text, first = body.get("prompt"), body.get("add_special_tokens")
        else:
            expected = {"content", "add_special", "parse_special"}
            text, first = body.get("content"), body.get("add_special")
            if body.get("parse_special") is not True:
                self.tokenize_problems.append("llama.cpp must parse the turn markers as special tokens")
        if set(body) != expected or not isinstance(text, str) or not isinstance(first, bool):
            self.tokenize_problems.append(f"malformed /tokenize body {body!r}")
            return web.json_response({"error": "bad body"}, status=400)
        self.tokenized.append(Tokenized(text, first, body, dict(request.headers)))
        reply = self.tokenize_reply
        if reply == "hang":
            await asyncio.sleep(3600)
        if isinstance(reply, tuple):
            status, payload = reply
            if isinstance(payload, bytes):
                return web.Response(status=status, body=payload, content_type="application/json")
            return web.json_response(payload, status=status)
        count = fake_count(text, first)
        if self.kind == "vllm":
            return web.json_response({"count": count, "max_model_len": 32768, "tokens": list(range(count))})
        return web.json_response({"tokens": list(range(count))})


@asynccontextmanager
async def tokenizing(kind: str) -> AsyncIterator[TokenizingServer]:
    server = TokenizingServer(kind)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert not server.violations, f"{kind} received malformed completions: {server.violations}"
    assert not server.tokenize_problems, server.tokenize_problems


def exact_settings(tmp_path: Path, *servers: LocalServer, **overrides: Any) -> Any:
    return make_settings(
        tmp_path, allowed_endpoints=tuple(s.root_url for s in servers), local_exact_tokens=True, **overrides
    )


def plain(server: LocalServer, messages: list[chat_pb2.Message], **fields: Any) -> chat_pb2.CreateRequest:
    """A request without functions through the chatml wrapper (its turn markers are the cuts)."""
    return local_request(server, messages=messages, functions=[], wrapper="chatml", **fields)


async def tiktoken_count(gw: RunningGateway, request: chat_pb2.CreateRequest, **kwargs: Any) -> int:
    counted = await gw.chat.CountTokens(
        chat_pb2.CountTokensRequest.FromString(request.SerializeToString()), timeout=20, **kwargs
    )
    assert counted.encoding and counted.encoding != exact_count.ENCODING
    return int(counted.total_tokens)


# -- 1. LLMGW_LOCAL_EXACT_TOKENS ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vllm", "llamacpp"])
async def test_the_guard_uses_the_servers_count(tmp_path: Path, kind: str) -> None:
    async with tokenizing(kind) as server:
        async with running_gateway(exact_settings(tmp_path, server)) as gw:
            server.script(Answer(text="Hello!", prompt_tokens=0))  # no count: usage is the guard's
            response = await gw.chat.Create(plain(server, STEP_1), timeout=20)
            assert server.tokenized, "nothing was tokenized"
            prompt = server.last.prompt
            # The pieces are the prompt sent to the completion, cut at its last turn marker; only
            # the first carries the BOS; vLLM is asked by the model name, at the server root.
            assert "".join(t.text for t in server.tokenized) == prompt
            assert [t.first for t in server.tokenized] == [True, False]
            assert server.tokenized[1].text.startswith("<|im_start|>assistant")
            if kind == "vllm":
                assert {t.body["model"] for t in server.tokenized} == {"llama3.1:8b"}
            exact = fake_count(prompt, True)
            assert response.completion.usage.prompt_tokens == exact

            # A window the tiktoken count fits in but the server's count does not.
            counted = await tiktoken_count(gw, plain(server, STEP_1))
            assert counted < exact - 1
            sent = len(server.requests)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.chat.Create(plain(server, STEP_1, context_window=exact - 1), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in gw.chat.StreamCreate(
                    plain(server, STEP_1, context_window=exact - 1), timeout=20
                ):
                    pass
    for error in (info.value, streamed.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details, _ = error_details(error)
        assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
        assert details.metadata["encoding"] == "server"
        assert details.metadata["prompt_tokens"] == str(exact)
        assert details.metadata["context_window"] == str(exact - 1)
    assert len(server.requests) == sent, "a refused call reached the completion endpoint"


@pytest.mark.parametrize("kind", ["vllm", "llamacpp"])
async def test_the_next_step_tokenizes_only_its_new_part(tmp_path: Path, kind: str) -> None:
    async with tokenizing(kind) as server:
        async with running_gateway(exact_settings(tmp_path, server)) as gw:
            server.script(Answer(text="Noted.", prompt_tokens=0), Answer(text="May 4.", prompt_tokens=0))
            await gw.chat.Create(plain(server, STEP_1), timeout=20)
            first_prompt = server.last.prompt
            cached = server.tokenized[0].text  # the part before the last turn marker
            assert SYSTEM in cached and first_prompt.startswith(cached)
            step_1 = len(server.tokenized)

            response = await gw.chat.Create(plain(server, STEP_2), timeout=20)
            prompt = server.last.prompt
            again = server.tokenized[step_1:]
    assert prompt.startswith(cached)
    # Only what follows the cached prefix was sent, without a BOS, and the counts add up.
    assert again and "".join(t.text for t in again) == prompt[len(cached) :]
    assert not any(SYSTEM in t.text for t in again)
    assert not any(t.first for t in again)
    assert response.completion.usage.prompt_tokens == fake_count(prompt, True)


async def test_the_prefix_cache_is_per_organization(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    _, key_a = await make_key(db, "org-a")
    _, key_b = await make_key(db, "org-b")
    async with tokenizing("llamacpp") as server:
        async with running_gateway(exact_settings(tmp_path, server, auth="required")) as gw:
            paid: dict[str, list[Tokenized]] = {}
            for name, key in (("a", key_a), ("b", key_b), ("a again", key_a)):
                before = len(server.tokenized)
                server.script(Answer(text="Hi.", prompt_tokens=0))
                response = await gw.chat.Create(plain(server, STEP_1), metadata=bearer(key), timeout=20)
                assert response.completion.usage.prompt_tokens == fake_count(server.last.prompt, True)
                paid[name] = server.tokenized[before:]
    # org-b sent the same prompt after org-a: it paid its own full count, prefix included.
    for name in ("a", "b"):
        assert [t.first for t in paid[name]] == [True, False], name
        assert SYSTEM in paid[name][0].text
    assert [t.text for t in paid["b"]] == [t.text for t in paid["a"]]
    # org-a's second call found its own prefix.
    assert [(t.text, t.first) for t in paid["a again"]] == [(paid["a"][1].text, False)]


HOSTILE = [
    ("llamacpp", (404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})),
    ("vllm", (404, {"detail": "Not Found"})),
    ("vllm", (500, {"object": "error", "message": "tokenizer crashed", "code": 500})),
    ("llamacpp", (200, b"<html>this is not JSON")),
    ("llamacpp", (200, {"tokens": "abc"})),
    ("llamacpp", (200, {"tokens": list(range(100_000))})),  # far more tokens than the text has bytes
    ("llamacpp", (200, {"n_tokens": 12})),
    ("vllm", (200, {"count": -5})),
    ("vllm", (200, {"count": 0})),
    ("vllm", (200, {"count": True})),
    ("vllm", (200, {"count": 12.0})),
    ("vllm", (200, {"count": "12"})),
    ("vllm", (200, {"count": 10**12})),
    ("vllm", (200, {"count": None, "tokens": [1, 2, 3]})),
]


@pytest.mark.parametrize(("kind", "reply"), HOSTILE, ids=[f"{k}-{r[0]}-{str(r[1])[:24]}" for k, r in HOSTILE])
async def test_a_tokenize_that_cannot_count_falls_back_to_tiktoken(
    tmp_path: Path, kind: str, reply: tuple[int, Any]
) -> None:
    async with tokenizing(kind) as server:
        server.tokenize_reply = reply
        async with running_gateway(exact_settings(tmp_path, server)) as gw:
            counted = await tiktoken_count(gw, plain(server, STEP_1))
            # A window tiktoken's count does not fit: refused by tiktoken (a negative or zero
            # count, if trusted, would let it through) ...
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.chat.Create(plain(server, STEP_1, context_window=counted - 1), timeout=20)
            assert server.requests == [], "a prompt over the window reached the completion endpoint"
            asked = len(server.tokenized)
            # ... and a window it fits: answered, with tiktoken's count (a huge count, if trusted,
            # would refuse it).
            server.script(Answer(text="Hello!", prompt_tokens=0))
            response = await gw.chat.Create(plain(server, STEP_1), timeout=20)
    assert asked == 2, "the tokenize call is asked once per piece, not retried"
    details, _ = error_details(info.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert details.metadata["encoding"] != "server"
    assert response.completion.usage.prompt_tokens == counted
    assert response.completion.choices[0].message.content == "Hello!"


async def test_a_hung_tokenize_falls_back_without_waiting_for_the_upstream_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact_count, "TOKENIZE_SECONDS", 0.5)
    async with tokenizing("llamacpp") as server:
        server.tokenize_reply = "hang"
        # No caller deadline: the old code waited the upstream timeout (10 s here) per attempt.
        async with running_gateway(exact_settings(tmp_path, server, upstream_timeout=10.0)) as gw:
            counted = await tiktoken_count(gw, plain(server, STEP_1))
            server.script(Answer(text="Hello!", prompt_tokens=0))
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await gw.chat.Create(plain(server, STEP_1), timeout=60)
            took = loop.time() - started
    assert response.completion.usage.prompt_tokens == counted
    assert len(server.tokenized) == 2
    assert took < 5.0, f"the call waited {took:.1f} s behind a hung /tokenize"


async def test_tokenize_goes_only_to_the_calls_own_target(tmp_path: Path) -> None:
    local_key = "local-key-" + secrets.token_hex(16)
    async with tokenizing("llamacpp") as keyed, tokenizing("llamacpp") as other:
        settings = exact_settings(
            tmp_path,
            keyed,
            other,
            local_auth_type="bearer_token",
            local_base_url=keyed.root_url,
            local_api_key=local_key,
        )
        async with running_gateway(settings) as gw:
            await gw.chat.Create(plain(other, STEP_1), timeout=20)
            assert keyed.tokenized == [] and keyed.requests == []
            assert len(other.tokenized) == 2
            await gw.chat.Create(plain(keyed, STEP_1), timeout=20)
    # The local key goes with /tokenize to its own base URL only.
    assert all("Authorization" not in t.headers for t in other.tokenized)
    assert "Authorization" not in other.last.headers
    assert [t.headers.get("Authorization") for t in keyed.tokenized] == [f"Bearer {local_key}"] * 2
    assert keyed.last.headers.get("Authorization") == f"Bearer {local_key}"


async def test_a_tenant_url_to_a_private_address_is_refused_before_any_tokenize(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tenant's name resolves to loopback (as a DNS answer could): patched lookup, no traffic.
    monkeypatch.setattr(resolver_module, "system_lookup", loopback_lookup)
    caplog.set_level(logging.WARNING)
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    _, user = await make_key(db, "org-a")
    sink = ByteSink()
    await sink.start()
    try:
        tenant_url = f"http://internal.test:{sink.port}"
        unlisted_url = f"http://127.0.0.1:{sink.port}"
        settings = make_settings(
            tmp_path, auth="required", encryption_key="pass-" + secrets.token_hex(8), local_exact_tokens=True
        )
        async with running_gateway(settings) as gw:
            # The organization's own BYOK base URL: allowed as a URL, but not to a private address.
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="mine",
                    model_endpoint_type="llamacpp",
                    base_url=tenant_url,
                    api_key="byok-" + secrets.token_hex(16),
                ),
                metadata=bearer(admin),
                timeout=10,
            )
            errors = []
            for url in (tenant_url, unlisted_url):
                request = local_request(
                    LocalServer("llamacpp"), messages=STEP_1, functions=[], wrapper="chatml", endpoint=url
                )
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await gw.chat.Create(request, metadata=bearer(user), timeout=10)
                errors.append(unary.value)
                with pytest.raises(grpc.aio.AioRpcError) as streamed:
                    async for _ in gw.chat.StreamCreate(request, metadata=bearer(user), timeout=10):
                        pass
                errors.append(streamed.value)
    finally:
        await sink.stop()
    for error in errors:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert error_details(error)[0].reason == "ENDPOINT_NOT_ALLOWED"
    assert (sink.connections, sink.received) == (0, 0)
    # Refused as such, not taken for a server that cannot count.
    assert "could not count" not in caplog.text


# -- 2. a BYOK key echoed in an error body --------------------------------------------------------


class EchoingErrors:
    """An OpenAI-compatible server that refuses every call with `status`, its error JSON quoting
    the Authorization header it received in several spellings; `cut` places one more copy of the
    key across the trace body's cut ("body": where a cut made before scrubbing would leave the
    key's start) or the message's cut ("message")."""

    def __init__(self) -> None:
        self.status = 401
        self.cut = ""
        self.authorizations: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._refuse)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp offers no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _refuse(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.authorizations.append(auth)
        key = auth.removeprefix("Bearer ")
        message = f"Incorrect API key provided: {auth}"
        if self.cut == "message":
            message = "x" * (provider_errors.MAX_MESSAGE_CHARS - 10) + key
        fields = [
            '"error": '
            + json.dumps({"message": message, "type": "invalid_request_error", "code": "invalid_key"}),
            '"detail": ' + json.dumps(f"key {key} was revoked"),
            '"url": ' + json.dumps(f"https://billing.example/keys?k={quote(key, safe='')}"),
            '"path": ' + json.dumps(f"/keys/{quote(key, safe='/')}"),
            '"php": "' + key.replace("/", "\\/") + '"',  # PHP's json_encode escapes "/"
        ]
        text = "{" + ", ".join(fields)
        if self.cut == "body":
            # The key starts 10 characters before the trace body's cut.
            pad = provider_errors.TRACE_BODY_CHARS - 10 - len(text) - len(', "pad": "", "tail": "')
            text += ', "pad": "' + "p" * pad + '", "tail": "'
            assert len(text) == provider_errors.TRACE_BODY_CHARS - 10
            text += key + '", "more": "' + "m" * 4096 + '"'  # so the scrubbed body is cut too
        return web.Response(status=self.status, text=text + "}", content_type="application/json")


def leaked(key: str, texts: list[str]) -> list[str]:
    """Pieces of `key` (its start, each random part) found in `texts`."""
    parts = [key[:10], *key[4:].replace("+", "/").rstrip("=").split("/")]
    return [
        f"{part!r} in ...{t[max(0, t.index(part) - 80) : t.index(part) + 40]!r}"
        for t in texts
        for part in parts
        if part in t
    ]


@pytest.mark.parametrize("cut", ["", "body", "message"])
@pytest.mark.parametrize("status", [401, 500])
async def test_a_byok_key_echoed_in_an_error_body_reaches_no_trace_error_or_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int, cut: str
) -> None:
    caplog.set_level(logging.DEBUG)
    key = f"byok{secrets.token_hex(12)}/{secrets.token_hex(8)}+{secrets.token_hex(8)}="
    db = tmp_path / "gateway.db"
    _, admin = await make_key(db, "org-a", admin=True)
    _, user = await make_key(db, "org-a")
    echo = EchoingErrors()
    echo.status, echo.cut = status, cut
    await echo.start()
    try:
        settings = make_settings(
            tmp_path,
            auth="required",
            encryption_key="pass-" + secrets.token_hex(8),
            allowed_endpoints=(echo.base_url,),
        )
        async with running_gateway(settings) as gw:
            await gw.providers.CreateProvider(
                providers_pb2.CreateProviderRequest(
                    name="echo", model_endpoint_type="openai", base_url=echo.base_url, api_key=key
                ),
                metadata=bearer(admin),
                timeout=10,
            )
            config = chat_pb2.LLMConfig(
                model="gpt-4o-mini",
                model_endpoint_type="openai",
                provider_name="echo",
                provider_category=chat_pb2.PROVIDER_CATEGORY_BYOK,
                context_window=128000,
            )
            seen: list[str] = []
            traces = []
            for n, streamed in enumerate((False, True)):
                request = chat_pb2.CreateRequest(
                    llm_config=config,
                    messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")],
                    trace=chat_pb2.TraceContext(step_id=f"echo-{n}"),
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if streamed:
                        async for _ in gw.chat.StreamCreate(request, metadata=bearer(user), timeout=30):
                            pass
                    else:
                        await gw.chat.Create(request, metadata=bearer(user), timeout=30)
                seen += error_texts(info.value)
                # The contract's rows: 401/403 FAILED_PRECONDITION, 5xx after the retries UNAVAILABLE.
                reason = "UPSTREAM_AUTH_FAILED" if status == 401 else "UPSTREAM_UNAVAILABLE"
                code = grpc.StatusCode.FAILED_PRECONDITION if status == 401 else grpc.StatusCode.UNAVAILABLE
                assert info.value.code() == code, info.value.details()
                assert error_details(info.value)[0].reason == reason
                trace = await wait_trace(gw, f"echo-{n}", bearer(user))
                traces.append(trace)
                seen.append(json_format.MessageToJson(trace))
    finally:
        await echo.stop()
    attempts = 1 if status < 500 else 3  # FAST_RETRY's budget for a 5xx
    assert echo.authorizations == [f"Bearer {key}"] * attempts * 2  # the key did go upstream
    for trace in traces:
        assert trace.is_byok and trace.error_type
        kept = json.loads(trace.response_json)
        assert kept["http_status"] == status
        assert "[REDACTED]" in kept["body"] and "revoked" in kept["body"]  # the body is kept, scrubbed
        # Cut only when it had to be (a scrubbed key shortens the body: that is no cut).
        assert kept["truncated"] is (cut == "body")
    logs = [caplog.text, *(r.getMessage() for r in caplog.records)]
    problems = leaked(key, seen) + leaked(key, logs) + leaked(key, [db_file(tmp_path)])
    assert not problems, "\n".join(problems)


def db_file(directory: Path) -> str:
    return b"".join(p.read_bytes() for p in sorted(directory.glob("gateway.db*")) if p.is_file()).decode(
        "latin-1"
    )


async def wait_trace(gw: RunningGateway, step_id: str, metadata: Any) -> Any:
    from tests.integration.test_security_e2e import wait_trace as wait

    return await wait(gw.traces, step_id, metadata)


# -- 3. local answers: unique ids, counts of unparseable answers ----------------------------------


async def test_concurrent_local_answers_without_functions_have_distinct_ids(tmp_path: Path) -> None:
    server = LocalServer("llamacpp")
    await server.start()
    try:
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(server.root_url,))) as gw:
            server.script(*(Answer(text=f"answer {n}") for n in range(50)))
            responses = await asyncio.gather(
                *(gw.chat.Create(local_request(server, functions=[]), timeout=60) for _ in range(50))
            )
    finally:
        await server.stop()
    assert not server.violations
    ids = [r.completion.id for r in responses]
    assert all(i.startswith("chatcmpl-local-") for i in ids)
    assert len(set(ids)) == 50, f"{50 - len(set(ids))} duplicate ids"
    assert len(server.requests) == 50


@pytest.mark.parametrize("streamed", [False, True], ids=["Create", "StreamCreate"])
@pytest.mark.parametrize("kind", ["llamacpp", "ollama", "vllm"])
async def test_an_unparseable_local_answer_keeps_the_servers_counts(
    tmp_path: Path, kind: str, streamed: bool
) -> None:
    server = LocalServer(kind)
    await server.start()
    try:
        async with running_gateway(make_settings(tmp_path, allowed_endpoints=(server.root_url,))) as gw:
            server.script(
                Answer(text="I will not call anything today.", prompt_tokens=321, completion_tokens=23)
            )
            request = local_request(server, step_id=f"garbled-{kind}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if streamed:
                    async for _ in gw.chat.StreamCreate(request, timeout=20):
                        pass
                else:
                    await gw.chat.Create(request, timeout=20)
            trace = await trace_of(gw, f"garbled-{kind}")
    finally:
        await server.stop()
    assert not server.violations
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(info.value)[0].reason == "UNPARSEABLE_MODEL_OUTPUT"
    assert trace.error_type == "UNPARSEABLE_MODEL_OUTPUT"
    assert (trace.usage.prompt_tokens, trace.usage.completion_tokens, trace.usage.total_tokens) == (
        321,
        23,
        344,
    )
