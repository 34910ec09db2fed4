"""Calls to OpenAI-compatible `/chat/completions`: one JSON answer, or an SSE stream.

Both paths retry through `server.core.retry` before anything was relayed; a stream is never
retried after its first chunk. The caller's deadline bounds every attempt and every sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from server.config import RetrySettings
from server.core.retry import Deadline, call_with_retries
from server.errors import DeadlineExceeded, GatewayError, UpstreamBadResponse, UpstreamUnavailable
from server.providers.base import UpstreamTarget
from server.providers.errors import connection_error, error_for_status, error_in_body
from server.providers.http import HttpClient, read_limited

MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_SSE_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass(slots=True)
class CallOptions:
    """What every upstream call needs besides the body."""

    deadline: Deadline
    retry: RetrySettings
    default_timeout: float  # used when the caller set no deadline
    scrub: Callable[[str], str]
    on_retry: Callable[[int, float, int], None] | None = None

    def timeout(self, *, stream: bool = False) -> aiohttp.ClientTimeout:
        remaining = self.deadline.remaining()
        if remaining is None:
            if stream:  # a long answer may stream for longer; a silent upstream may not
                return aiohttp.ClientTimeout(total=None, sock_connect=self.default_timeout,
                                             sock_read=self.default_timeout)
            return aiohttp.ClientTimeout(total=self.default_timeout)
        if remaining <= 0:
            raise DeadlineExceeded("the caller's deadline passed before the upstream answered")
        return aiohttp.ClientTimeout(total=remaining)


def _headers(target: UpstreamTarget, base: dict[str, str]) -> dict[str, str]:
    return {**base, **target.headers}


async def post_json(
    client: HttpClient, target: UpstreamTarget, url: str, body: bytes, options: CallOptions
) -> tuple[bytes, dict[str, Any]]:
    """POST a JSON body; return the raw answer and its parsed JSON object (retries included)."""
    headers = _headers(target, _JSON_HEADERS)

    async def attempt() -> tuple[bytes, dict[str, Any]]:
        try:
            async with client.session.post(
                url, data=body, headers=headers, timeout=options.timeout(), allow_redirects=False
            ) as response:
                raw = await read_limited(response, MAX_BODY_BYTES)
                status = response.status
                response_headers = response.headers
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise connection_error(exc, provider=target.provider, scrub=options.scrub) from exc
        except TimeoutError as exc:
            raise _timed_out(options, target) from exc
        if status >= 300:
            error = error_for_status(
                status, raw, response_headers, provider=target.provider, scrub=options.scrub
            )
            raise error
        return raw, parse_json_object(raw, provider=target.provider, scrub=options.scrub)

    return await call_with_retries(attempt, settings=options.retry, deadline=options.deadline,
                                   on_retry=options.on_retry)


def _timed_out(options: CallOptions, target: UpstreamTarget) -> GatewayError:
    if options.deadline.at is not None:
        return DeadlineExceeded(
            f"{target.provider} did not answer within the caller's deadline",
            metadata={"provider": target.provider},
        )
    return UpstreamUnavailable(
        f"{target.provider} did not answer within {options.default_timeout:g} s",
        metadata={"provider": target.provider, "timeout_seconds": options.default_timeout},
    )


def parse_json_object(raw: bytes, *, provider: str, scrub: Callable[[str], str]) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        snippet = scrub(raw[:200].decode("utf-8", "replace"))
        raise UpstreamBadResponse(
            f"{provider} answered something that is not JSON: {snippet!r}",
            metadata={"provider": provider, "bytes": len(raw)},
        ) from exc
    if not isinstance(payload, dict):
        raise UpstreamBadResponse(
            f"{provider} answered JSON that is not an object", metadata={"provider": provider}
        )
    if payload.get("error") and not payload.get("choices"):
        raise error_in_body(payload, provider=provider, scrub=scrub)
    return payload


async def open_stream(
    client: HttpClient, target: UpstreamTarget, url: str, body: bytes, options: CallOptions
) -> aiohttp.ClientResponse:
    """Open an SSE stream (retries included); the caller must release the response."""
    headers = _headers(target, _SSE_HEADERS)

    async def attempt() -> aiohttp.ClientResponse:
        try:
            response = await client.session.post(
                url, data=body, headers=headers, timeout=options.timeout(stream=True), allow_redirects=False
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(exc, provider=target.provider, scrub=options.scrub) from exc
        except TimeoutError as exc:
            raise _timed_out(options, target) from exc
        if response.status >= 300:
            try:
                raw = await read_limited(response, MAX_BODY_BYTES)
            except (aiohttp.ClientError, OSError, ValueError, TimeoutError):
                raw = b""
            finally:
                response.release()
            raise error_for_status(
                response.status, raw, response.headers, provider=target.provider, scrub=options.scrub
            )
        return response

    return await call_with_retries(attempt, settings=options.retry, deadline=options.deadline,
                                   on_retry=options.on_retry)


async def sse_events(
    response: aiohttp.ClientResponse, *, provider: str, scrub: Callable[[str], str]
) -> AsyncIterator[dict[str, Any] | None]:
    """Yield each SSE event's JSON object; None once for `[DONE]`.

    Keep-alive comments (`: ...`), `event:`/`id:`/`retry:` fields and blank lines are skipped;
    multi-line `data:` fields are joined with newlines as the SSE spec says.
    """
    buffer = b""
    data_lines: list[bytes] = []
    try:
        async for piece in response.content.iter_any():
            buffer += piece
            if len(buffer) > MAX_BODY_BYTES:
                raise UpstreamBadResponse(f"{provider} sent an SSE line over {MAX_BODY_BYTES} bytes")
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    if data_lines:
                        event = _decode_event(data_lines, provider=provider, scrub=scrub)
                        data_lines = []
                        yield event
                        if event is None:
                            return
                    continue
                if line.startswith(b"data:"):
                    value = line[5:]
                    data_lines.append(value[1:] if value.startswith(b" ") else value)
                # Comments (":") and other fields are ignored.
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(
            f"{provider} broke the stream: {scrub(str(exc)) or type(exc).__name__}",
            metadata={"provider": provider, "error_type": type(exc).__name__},
        ) from exc
    tail = buffer.rstrip(b"\r")
    if tail.startswith(b"data:"):
        value = tail[5:]
        data_lines.append(value[1:] if value.startswith(b" ") else value)
    if data_lines:
        yield _decode_event(data_lines, provider=provider, scrub=scrub)


def _decode_event(data_lines: list[bytes], *, provider: str, scrub: Callable[[str], str]) -> dict[str, Any] | None:
    data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
    if data.strip() == b"[DONE]":
        return None
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamBadResponse(
            f"{provider} sent an SSE event that is not JSON: {scrub(data[:200].decode('utf-8', 'replace'))!r}",
            metadata={"provider": provider},
        ) from exc
    if not isinstance(event, dict):
        raise UpstreamBadResponse(f"{provider} sent an SSE event that is not an object", metadata={"provider": provider})
    if event.get("error"):
        raise error_in_body(event, provider=provider, scrub=scrub)
    return event
