"""The console's pages, rendered on the server with `server.admin.html` (escaped by construction)."""

from __future__ import annotations

from typing import Any

from server.admin.data import FILTERS, WINDOWS, ChatItem, ListFilters, TracePage, pretty_json
from server.admin.html import Markup, el, json_script, url
from server.auth.actor import Actor
from server.routing.attempts import route_attempts
from server.traces.base import TraceRecord

_FILTER_LABELS = {
    "model": "model",
    "provider": "provider",
    "error_type": "error type",
    "status": "status",
    "step_id": "step",
    "run_id": "run",
    "agent_id": "agent",
    "tag": "tag",
}


def layout(title: str, actor: Actor | None, *body: object, scripts: tuple[str, ...] = ()) -> Markup:
    who = None
    if actor is not None and not actor.is_anonymous:
        who = el(
            "form",
            {"method": "post", "action": "/logout", "class": "logout"},
            f"{actor.organization_id}{' (admin)' if actor.is_admin else ''} ",
            el("button", {"type": "submit"}, "log out"),
        )
    head = el(
        "head",
        None,
        el("meta", {"charset": "utf-8"}),
        el("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
        el("title", None, f"{title} - llm-gateway"),
        el("link", {"rel": "stylesheet", "href": "/static/uplot.min.css"}),
        el("link", {"rel": "stylesheet", "href": "/static/console.css"}),
    )
    nav = el(
        "nav",
        None,
        el("a", {"href": "/", "class": "brand"}, "llm-gateway"),
        el("a", {"href": "/"}, "overview"),
        el("a", {"href": "/traces"}, "traces"),
        el("a", {"href": "/metrics"}, "metrics"),
        who,
    )
    tail = [el("script", {"src": f"/static/{name}"}) for name in scripts]
    return Markup(
        "<!doctype html>"
        + el(
            "html",
            {"lang": "en"},
            head,
            el("body", None, nav, el("main", None, el("h1", None, title), *body), tail),
        )
    )


def login_page(error: str = "") -> Markup:
    return layout(
        "Log in",
        None,
        el("p", {"class": "error"}, error) if error else None,
        el(
            "form",
            {"method": "post", "action": "/login", "class": "login"},
            el("label", {"for": "key"}, "gateway key"),
            el(
                "input",
                {"id": "key", "name": "key", "type": "password", "autocomplete": "off", "required": True},
            ),
            el("button", {"type": "submit", "id": "login"}, "log in"),
        ),
    )


def error_page(actor: Actor | None, status: int, message: str) -> Markup:
    return layout(f"{status}", actor, el("p", {"class": "error"}, message))


def overview_page(actor: Actor, data: dict[str, Any]) -> Markup:
    window = data["window"]
    tabs = el(
        "p",
        {"class": "windows"},
        [
            el(
                "a",
                {"href": url("/", {"window": w}), "class": "active" if w == window else None},
                f"last {w}",
            )
            for w in WINDOWS
        ],
    )
    note = None
    if data["capped"]:
        note = el("p", {"class": "note"}, "Drawn from the newest 100,000 traces of the window.")
    rows = [
        el(
            "tr",
            None,
            el("td", None, row["provider"]),
            el("td", None, el("a", {"href": url("/traces", {"model": row["model"]})}, row["model"])),
            el("td", {"class": "num"}, row["requests"]),
            el("td", {"class": "num"}, row["errors"]),
            el("td", {"class": "num"}, row["prompt_tokens"]),
            el("td", {"class": "num"}, row["completion_tokens"]),
            el("td", {"class": "num"}, _ms(row["p50_ms"])),
            el("td", {"class": "num"}, _ms(row["p99_ms"])),
        )
        for row in data["by_model"]
    ]
    table = el(
        "table",
        {"id": "by-model"},
        el(
            "thead",
            None,
            el(
                "tr",
                None,
                [
                    el("th", None, h)
                    for h in (
                        "provider",
                        "model",
                        "requests",
                        "errors",
                        "prompt tokens",
                        "completion tokens",
                        "p50 latency",
                        "p99 latency",
                    )
                ],
            ),
        ),
        el("tbody", None, rows),
    )
    charts = el(
        "section",
        {"class": "charts"},
        el(
            "figure",
            None,
            el("figcaption", None, "requests and errors per minute"),
            el("div", {"id": "chart-requests", "class": "chart"}),
        ),
        el(
            "figure",
            None,
            el("figcaption", None, "latency and time to first token, p50 / p99 (ms)"),
            el("div", {"id": "chart-latency", "class": "chart"}),
        ),
        el(
            "figure",
            None,
            el("figcaption", None, "tokens by model"),
            el("div", {"id": "chart-tokens", "class": "chart"}),
        ),
    )
    summary = el(
        "p",
        {"class": "summary", "id": "summary"},
        f"{data['traces']} traces, {data['errors']} errors in the last {window}.",
    )
    return layout(
        "Overview",
        actor,
        tabs,
        summary,
        note,
        charts,
        el("h2", None, "By provider and model"),
        table,
        json_script("overview-data", data),
        scripts=("uplot.min.js", "console.js"),
    )


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms"


def traces_page(actor: Actor, filters: ListFilters, page: TracePage) -> Markup:
    values = filters.values
    inputs = []
    for name in FILTERS:
        if name == "status":
            options = [
                el("option", {"value": v, "selected": values["status"] == v}, label)
                for v, label in (("", "any"), ("ok", "ok"), ("error", "error"))
            ]
            field = el("select", {"id": "f-status", "name": "status"}, options)
        else:
            field = el("input", {"id": f"f-{name}", "name": name, "value": values[name]})
        inputs.append(el("label", None, _FILTER_LABELS[name], field))
    for name, label in (("start", "from"), ("end", "until")):
        inputs.append(
            el(
                "label",
                None,
                label,
                el(
                    "input",
                    {
                        "id": f"f-{name}",
                        "name": name,
                        "value": values[name],
                        "placeholder": "2026-01-31T12:00Z",
                    },
                ),
            )
        )
    form = el(
        "form",
        {"method": "get", "action": "/traces", "class": "filters", "id": "filters"},
        inputs,
        el("button", {"type": "submit", "id": "apply"}, "filter"),
    )
    rows = [
        el(
            "tr",
            {"class": "trace-row error" if r.error_type else "trace-row"},
            el(
                "td",
                None,
                el("a", {"href": url(f"/traces/{r.id}")}, r.created_at.strftime("%Y-%m-%d %H:%M:%S")),
            ),
            el("td", None, r.provider),
            el("td", {"class": "model"}, r.model),
            el("td", None, r.error_type or "ok"),
            el("td", {"class": "num"}, f"{r.latency_ms:.0f} ms"),
            el(
                "td",
                {"class": "num"},
                f"{r.time_to_first_token_ms:.0f} ms" if r.time_to_first_token_ms else "",
            ),
            el("td", {"class": "num"}, r.total_tokens),
            el("td", None, r.step_id),
            el("td", None, r.run_id),
            el("td", None, r.agent_id),
            el("td", None, ", ".join(r.agent_tags)),
        )
        for r in page.traces
    ]
    table = el(
        "table",
        {"id": "traces"},
        el(
            "thead",
            None,
            el(
                "tr",
                None,
                [
                    el("th", None, h)
                    for h in (
                        "time (UTC)",
                        "provider",
                        "model",
                        "status",
                        "latency",
                        "TTFT",
                        "tokens",
                        "step",
                        "run",
                        "agent",
                        "tags",
                    )
                ],
            ),
        ),
        el("tbody", None, rows),
    )
    more = None
    if page.next_page:
        query = {k: v for k, v in values.items() if v}
        query["page"] = page.next_page
        more = el("p", None, el("a", {"href": url("/traces", query), "id": "next-page"}, "older traces"))
    empty = el("p", {"class": "note"}, "No trace matches.") if not page.traces else None
    return layout("Traces", actor, form, table, empty, more)


def _message(item: ChatItem, index: int) -> Markup:
    parts: list[object] = [
        el(
            "div",
            {"class": "role"},
            item.role
            + (f" ({item.name})" if item.name else "")
            + (f" - result of {item.tool_call_id}" if item.tool_call_id else ""),
        ),
    ]
    if item.reasoning:
        parts.append(
            el(
                "details",
                {"class": "reasoning"},
                el("summary", None, "reasoning"),
                el("pre", None, item.reasoning),
            )
        )
    if item.text:
        parts.append(el("div", {"class": "text"}, item.text))
    for call in item.tool_calls:
        parts.append(
            el(
                "div",
                {"class": "tool-call"},
                el(
                    "div",
                    {"class": "tool-name"},
                    f"tool call: {call.name}" + (f" ({call.id})" if call.id else ""),
                ),
                el("pre", {"class": "tool-args"}, call.arguments),
            )
        )
    return el("div", {"class": f"message role-{_role_class(item.role)}", "data-index": index}, parts)


def _role_class(role: str) -> str:
    return role if role in ("system", "developer", "user", "assistant", "tool") else "other"


def trace_page(actor: Actor, record: TraceRecord, items: list[ChatItem]) -> Markup:
    facts = [
        ("id", record.id),
        ("time (UTC)", record.created_at.isoformat()),
        ("provider", record.provider),
        ("model", record.model),
        ("endpoint type", record.model_endpoint_type),
        ("step", record.step_id),
        ("run", record.run_id),
        ("agent", record.agent_id),
        ("tags", ", ".join(record.agent_tags)),
        ("call type", record.call_type),
        ("user", record.user_id),
        ("latency", f"{record.latency_ms:.1f} ms"),
        (
            "time to first token",
            f"{record.time_to_first_token_ms:.1f} ms" if record.time_to_first_token_ms else "-",
        ),
        ("prompt tokens", str(record.prompt_tokens)),
        ("completion tokens", str(record.completion_tokens)),
        ("cached tokens", str(record.cached_tokens)),
        ("reasoning tokens", str(record.reasoning_tokens)),
        ("total tokens", str(record.total_tokens)),
    ]
    facts_table = el(
        "table",
        {"id": "facts"},
        el("tbody", None, [el("tr", None, el("th", None, k), el("td", None, v)) for k, v in facts]),
    )
    error = None
    if record.error_type:
        error = el(
            "section",
            {"class": "error", "id": "error"},
            el("h2", None, "Error"),
            el("p", None, el("strong", None, record.error_type)),
            el("pre", None, record.error_message),
        )
    routing = _routing(record)
    chat = el(
        "section",
        {"id": "conversation", "class": "chat"},
        [_message(item, i) for i, item in enumerate(items)],
    )
    raw = el(
        "section",
        {"class": "raw"},
        el(
            "details",
            None,
            el("summary", None, "request JSON"),
            el("pre", {"id": "raw-request"}, pretty_json(record.request_json)),
        ),
        el(
            "details",
            None,
            el("summary", None, "response JSON"),
            el("pre", {"id": "raw-response"}, pretty_json(record.response_json)),
        ),
        el(
            "details",
            None,
            el("summary", None, "LLM config"),
            el("pre", None, pretty_json(record.llm_config_json)),
        ),
    )
    return layout(
        "Trace",
        actor,
        facts_table,
        error,
        routing,
        el("h2", None, "Conversation"),
        chat,
        el("h2", None, "Raw"),
        raw,
    )


def _routing(record: TraceRecord) -> Markup | None:
    """A routed call's route, the deployment of this trace and every attempt so far (none: direct)."""
    attempts = route_attempts(record.attempts_json)
    if not (record.route or record.deployment or attempts):
        return None
    head = el("tr", None, [el("th", None, h) for h in ("route", "deployment", "status", "latency")])
    rows = [
        el(
            "tr",
            None,
            el("td", None, a.route),
            el("td", None, a.deployment),
            el("td", None, a.status),
            el("td", None, f"{a.latency_ms:.1f} ms"),
        )
        for a in attempts
    ]
    return el(
        "section",
        {"id": "routing"},
        el("h2", None, "Routing"),
        el(
            "p",
            None,
            "route ",
            el("strong", None, record.route or "-"),
            ", deployment ",
            el("strong", None, record.deployment),
        ),
        el("table", {"id": "attempts"}, el("thead", None, head), el("tbody", None, rows)),
    )
