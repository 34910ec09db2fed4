"""The console's filters and overview on every trace backend (SQLite, Postgres, ClickHouse):
the same traces, the same answers, scoped to the organization and (non-admin) the user."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from server.admin import data
from server.auth.actor import Actor
from server.errors import InvalidRequest
from server.traces.base import TraceBackend, TraceQuery, TraceRecord, to_micros, trace_owner
from tests.integration.test_trace_backends import BASE_TIME, NASTY, backend, new_backend, trace

__all__ = ["backend", "new_backend"]  # the fixtures, parametrized over the three backends

ADMIN = Actor(organization_id="org-1", is_admin=True, key_id="k-admin")
USER = Actor(organization_id="org-1", user_id="u1", key_id="k-user")
OTHER_ORG = Actor(organization_id="org-2", is_admin=True, key_id="k-other")
NOW = BASE_TIME + timedelta(minutes=30)


def _records() -> list[TraceRecord]:
    """40 traces over the last half hour: 2 orgs, 2 owners, 3 models, 2 providers, errors, tags."""
    out = []
    for i in range(40):
        org = "org-2" if i % 5 == 0 else "org-1"
        owner = trace_owner(user_id="u1", key_id="k-user") if i % 3 == 0 else "user:u2"
        error = ("UPSTREAM_REJECTED" if i % 2 else "UPSTREAM_UNAVAILABLE") if i % 7 == 0 else ""
        out.append(
            trace(
                org=org,
                step=f"step-{i % 4}",
                at=NOW - timedelta(seconds=45 * i + 1),
                owner=owner,
                model=("gpt-a", "claude-b", NASTY)[i % 3],
                provider=("openai", "anthropic")[i % 2],
                model_endpoint_type=("openai", "anthropic")[i % 2],
                error_type=error,
                error_message="boom" if error else "",
                agent_tags=["blue", "x'y"] if i % 4 == 0 else ["red"],
                latency_ms=10.0 + i,
                time_to_first_token_ms=float(i % 3),
                prompt_tokens=i,
                completion_tokens=2 * i,
                total_tokens=3 * i,
            )
        )
    return out


def _expected(records: list[TraceRecord], query: TraceQuery) -> list[str]:
    def keep(r: TraceRecord) -> bool:
        return (
            r.organization_id == query.organization_id
            and (query.owner is None or r.owner == query.owner)
            and all(
                not getattr(query, f) or getattr(r, f) == getattr(query, f)
                for f in ("step_id", "run_id", "agent_id", "model", "provider", "error_type")
            )
            and (not query.trace_id or r.id == query.trace_id)
            and (query.status != "ok" or not r.error_type)
            and (query.status != "error" or bool(r.error_type))
            and (not query.tag or query.tag in r.agent_tags)
            and (query.start_time is None or r.created_at >= query.start_time)
            and (query.end_time is None or r.created_at < query.end_time)
        )

    ordered = sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)
    return [r.id for r in ordered if keep(r)][: query.limit]


FILTERS: list[dict[str, Any]] = [
    {},
    {"model": "gpt-a"},
    {"model": NASTY},
    {"provider": "anthropic"},
    {"error_type": "UPSTREAM_REJECTED"},
    {"status": "ok"},
    {"status": "error"},
    {"status": "error", "provider": "openai"},
    {"tag": "blue"},
    {"tag": "x'y"},
    {"tag": "bl"},  # a prefix of a tag is not the tag
    {"step_id": "step-2", "model": "claude-b"},
    {"start_time": NOW - timedelta(minutes=10), "end_time": NOW - timedelta(minutes=2)},
    # Injection attempts: plain values that match nothing.
    {"model": "' OR '1'='1"},
    {"tag": "blue') OR 1=1 --"},
    {"provider": "openai\\' OR 1=1 -- "},
    {"error_type": "%"},
]


@pytest.mark.parametrize("actor", [ADMIN, USER, OTHER_ORG], ids=["admin", "user", "other-org"])
async def test_console_filters_answer_the_same_on_every_backend(backend: TraceBackend, actor: Actor) -> None:
    records = _records()
    await backend.write_batch(records=records)
    for filters in FILTERS:
        query = TraceQuery(
            organization_id=actor.organization_id, owner=data.readable_owner(actor), limit=200, **filters
        )
        want = _expected(records, query)
        got = [r.id for r in await backend.list(query=query)]
        assert got == want, filters
        points = await backend.points(query=query)
        by_id = {r.id: r for r in records}
        assert [(p.created_at_us, p.model, p.error_type) for p in points] == [
            (to_micros(by_id[i].created_at), by_id[i].model, by_id[i].error_type) for i in want
        ], filters
    # A trace by id: only in its organization, and for a non-admin only its user's.
    for record in records:
        query = TraceQuery(
            organization_id=actor.organization_id,
            owner=data.readable_owner(actor),
            trace_id=record.id,
            limit=1,
        )
        found = [r.id for r in await backend.list(query=query)]
        assert found == _expected(records, query)


async def test_console_overview_answers_the_same_on_every_backend(backend: TraceBackend) -> None:
    records = _records()
    await backend.write_batch(records=records)
    for actor in (ADMIN, USER, OTHER_ORG):
        got = await data.overview(backend, actor, "hour", now=NOW)
        owner = data.readable_owner(actor)
        mine = [
            r
            for r in records
            if r.organization_id == actor.organization_id and (owner is None or r.owner == owner)
        ]
        assert got["traces"] == len(mine) > 0
        assert got["errors"] == sum(1 for r in mine if r.error_type)
        table = {(row["provider"], row["model"]): row for row in got["by_model"]}
        assert set(table) == {(r.provider, r.model) for r in mine}  # nothing of another org or user
        for (provider, model), row in table.items():
            group = [r for r in mine if (r.provider, r.model) == (provider, model)]
            assert row["requests"] == len(group)
            assert row["errors"] == sum(1 for r in group if r.error_type)
            assert row["prompt_tokens"] == sum(r.prompt_tokens for r in group)
            assert row["completion_tokens"] == sum(r.completion_tokens for r in group)
            ok = sorted(r.latency_ms for r in group if not r.error_type)
            assert row["p50_ms"] == (round(ok[max(1, -(-len(ok) // 2)) - 1], 3) if ok else None)
        assert sum(got["requests_per_minute"]) == pytest.approx(len(mine))


EDGE_FILTERS: list[dict[str, str]] = [
    {"model": "a\x00b"},  # NUL: Postgres text cannot hold it
    {"tag": "t\x00"},
    {"step_id": "\ufffd\ufffd"},  # what an invalid UTF-8 query string decodes to
    {"start": "9999-12-31T23:00-01:00"},  # beyond year 9999 in UTC
    {"end": "0001-01-01T00:30+01:00"},  # before year 1 in UTC
    {"start": "2025-06-01T13:00:00.123456789Z"},  # after every trace,
]


@pytest.mark.parametrize("params", EDGE_FILTERS, ids=lambda f: repr(f)[:40])
async def test_odd_console_filters_are_refused_or_match_nothing(
    backend: TraceBackend, params: dict[str, str]
) -> None:
    """The console's query string either is refused (400) or becomes a query the backend
    answers: never an exception from the store (a 500)."""
    await backend.write_batch(records=_records())
    try:
        filters = data.parse_filters(params)
    except InvalidRequest:
        return
    page = await data.list_traces(backend, ADMIN, filters)
    assert page.traces == []
    query = data._query(ADMIN, filters, limit=50)  # noqa: SLF001 - the overview's filter shape
    assert await backend.points(query=query) == []
