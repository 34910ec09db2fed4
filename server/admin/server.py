"""The admin listener: an aiohttp application on the gRPC server's event loop.

Routes: `/metrics` (Prometheus text), the console pages (`/`, `/traces`, `/traces/{id}`), their
JSON (`/api/overview`, `/api/traces`, `/api/traces/{id}`), `/login`, `/logout` and `/static/*`
(a fixed set of files read once at start: no path from a request ever reaches the filesystem).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from server import metrics
from server.admin import data, pages
from server.admin.access import COOKIE, SESSION_SECONDS, Access, Refused, bearer_of, host_allowed
from server.auth.actor import Actor
from server.errors import GatewayError
from server.traces.base import TraceBackend

log = logging.getLogger("llmgateway.admin")

_STATIC_TYPES = {
    "uplot.min.js": "text/javascript",
    "uplot.min.css": "text/css",
    "console.js": "text/javascript",
    "console.css": "text/css",
    "uplot.LICENSE": "text/plain",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_ACTOR = web.AppKey("actor", Actor)


def _static_files() -> dict[str, bytes]:
    folder = resources.files("server.admin") / "static"
    return {name: (folder / name).read_bytes() for name in _STATIC_TYPES}


class AdminServer:
    """Serves the admin application on `listen` (host:port) until `stop()`."""

    def __init__(self, listen: str, *, reader: TraceBackend | None, access: Access) -> None:
        self._listen = listen
        self._reader = reader
        self._access = access
        self._static = _static_files()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.add_routes(
            [
                web.get("/metrics", self._metrics),
                web.get("/static/{name}", self._static_file),
                web.get("/login", self._login_form),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/", self._overview),
                web.get("/traces", self._traces),
                web.get("/traces/{trace_id}", self._trace),
                web.get("/api/overview", self._api_overview),
                web.get("/api/traces", self._api_traces),
                web.get("/api/traces/{trace_id}", self._api_trace),
            ]
        )
        return app

    async def start(self) -> int:
        host, _, port = self._listen.rpartition(":")
        host = host.strip("[]")
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, int(port), reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # noqa: SLF001 - the bound port when 0 was asked for
        sockets = getattr(server, "sockets", None) or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else int(port)
        log.info("admin listener (metrics and console) on %s (port %d)", self._listen, self.port)
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middleware ------------------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not host_allowed(request.host, loopback=self._access.loopback):
            return _headers(web.Response(status=421, text="this listener answers loopback host names only"))
        if request.method == "POST" and not _same_origin(request):
            return _headers(web.Response(status=403, text="cross-origin request refused"))
        try:
            response = await handler(request)
        except Refused as refused:
            response = self._refused(request, refused)
        except GatewayError as error:  # a bad filter: INVALID_REQUEST
            response = self._answer(request, 400, error.message, None)
        return _headers(response)

    def _refused(self, request: web.Request, refused: Refused) -> web.StreamResponse:
        if refused.status == 401 and not _is_api(request) and request.path != "/metrics":
            return _redirect("/login")
        return self._answer(request, refused.status, refused.message, None)

    def _answer(
        self, request: web.Request, status: int, message: str, actor: Actor | None
    ) -> web.StreamResponse:
        if _is_api(request) or request.path == "/metrics":
            return _json({"error": message}, status=status)
        return _html(pages.error_page(actor, status, message), status=status)

    async def _actor(self, request: web.Request) -> Actor:
        return await self._access.actor(
            bearer=bearer_of(request.headers.get("Authorization")), session_id=request.cookies.get(COOKIE)
        )

    def _require_reader(self) -> TraceBackend:
        reader = self._reader
        if reader is None or not reader.readable:
            name = reader.name if reader is not None else "none"
            raise _Unreadable(name)
        return reader

    # -- routes ----------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        await self._access.metrics_allowed(
            bearer=bearer_of(request.headers.get("Authorization")), session_id=request.cookies.get(COOKIE)
        )
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = self._static.get(name)
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(
            body=body, content_type=_STATIC_TYPES[name], headers={"Cache-Control": "max-age=3600"}
        )

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        if not self._access.required:
            return _redirect("/")
        return _html(pages.login_page())

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("key", "")).strip()
        actor = await self._access.check_key(token)
        if actor is None:
            return _headers(_html(pages.login_page("That key cannot open this console."), status=401))
        session_id = self._access.sessions.open(token)
        response = _redirect("/")
        response.set_cookie(
            COOKIE, session_id, httponly=True, samesite="Strict", path="/", max_age=SESSION_SECONDS
        )
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session_id = request.cookies.get(COOKIE)
        if session_id:
            self._access.sessions.close(session_id)
        response = _redirect("/login" if self._access.required else "/")
        response.del_cookie(COOKIE, path="/")
        return response

    async def _overview(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        overview = await data.overview(self._require_reader(), actor, request.query.get("window", "hour"))
        return _html(pages.overview_page(actor, overview))

    async def _traces(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        filters = data.parse_filters(request.query)
        page = await data.list_traces(self._require_reader(), actor, filters)
        return _html(pages.traces_page(actor, filters, page))

    async def _trace(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        record = await data.get_trace(self._require_reader(), actor, request.match_info["trace_id"])
        if record is None:
            return _html(pages.error_page(actor, 404, "no such trace"), status=404)
        # A trace may be megabytes of JSON to parse, pretty-print and escape: off the loop the
        # gRPC calls share.
        body = await asyncio.to_thread(lambda: pages.trace_page(actor, record, data.conversation(record)))
        return _html(body)

    async def _api_overview(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        return _json(await data.overview(self._require_reader(), actor, request.query.get("window", "hour")))

    async def _api_traces(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        page = await data.list_traces(self._require_reader(), actor, data.parse_filters(request.query))
        return _json({"traces": [data.trace_summary(r) for r in page.traces], "next_page": page.next_page})

    async def _api_trace(self, request: web.Request) -> web.StreamResponse:
        actor = await self._actor(request)
        record = await data.get_trace(self._require_reader(), actor, request.match_info["trace_id"])
        if record is None:
            return _json({"error": "no such trace"}, status=404)

        def answer() -> bytes:  # megabytes of JSON, as the page: off the loop
            detail = data.trace_detail(record)
            detail["conversation"] = [_item_json(item) for item in data.conversation(record)]
            return orjson.dumps(detail)

        return web.Response(body=await asyncio.to_thread(answer), content_type="application/json")


class _Unreadable(Refused):
    def __init__(self, name: str) -> None:
        super().__init__(
            409,
            f"the first trace backend ({name}) is write-only; "
            "put a readable one first in LLMGW_TRACE_BACKENDS",
        )


def _item_json(item: data.ChatItem) -> dict[str, Any]:
    return {
        "role": item.role,
        "text": item.text,
        "reasoning": item.reasoning,
        "name": item.name,
        "tool_call_id": item.tool_call_id,
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in item.tool_calls],
    }


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _same_origin(request: web.Request) -> bool:
    """A POST's Origin must be this listener's own (browsers always send it on a form POST)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return (
            request.headers.get("Sec-Fetch-Site") in (None, "same-origin")
            and "Referer" not in request.headers
        )
    return origin == f"{request.scheme}://{request.host}"


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _html(body: str, *, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _json(value: object, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on our own
    # form posts, and the CSRF check could not tell them from a foreign page's.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response
