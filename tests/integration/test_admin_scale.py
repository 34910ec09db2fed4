"""The console's trace list with a million traces in SQLite: indexes used, pages under 200 ms."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from server.traces import sqlite as trace_sqlite
from server.traces.base import TRACE_COLUMNS, TraceQuery
from tests.gateway_harness import make_settings, running_gateway

ROWS = 1_000_000
MODELS = [f"model-{i}" for i in range(20)]


def _fill(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in trace_sqlite.PRAGMAS:
        conn.execute(pragma)
    trace_sqlite.migrate(conn)
    start = 1_790_000_000_000_000  # microseconds
    columns = ("id", "created_at", "organization_id", "model", "provider", "model_endpoint_type",
               "error_type", "step_id", "latency_ms", "total_tokens", "owner")  # fmt: skip
    sql = f"INSERT INTO provider_traces ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    rows = (
        (
            f"provider_trace-{i:012d}", start + i * 1000, "default" if i % 10 else "org-x",
            MODELS[i % len(MODELS)], "openai", "openai", "UPSTREAM_UNAVAILABLE" if i % 97 == 0 else "",
            f"step-{i}", float(i % 500), i % 300, "",
        )
        for i in range(ROWS)
    )  # fmt: skip
    conn.execute("BEGIN")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")
    conn.close()


def _plan(path: Path, query: TraceQuery) -> str:
    where, params = trace_sqlite._where(query)
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT {', '.join(TRACE_COLUMNS)} FROM provider_traces"
            f" WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT 51",
            params,
        ).fetchall()
    finally:
        conn.close()
    return " | ".join(str(r[-1]) for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_list_page_is_fast_with_a_million_traces(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    _fill(db)
    org = "default"  # auth off: the anonymous actor's organization
    plans = {
        "all": _plan(db, TraceQuery(organization_id=org)),
        "model": _plan(db, TraceQuery(organization_id=org, model="model-3")),
        "error": _plan(db, TraceQuery(organization_id=org, error_type="UPSTREAM_UNAVAILABLE")),
    }
    assert "ix_provider_traces_org_created" in plans["all"] or "ix_provider_traces_org_owner" in plans["all"]
    assert "ix_provider_traces_org_model_created" in plans["model"], plans["model"]
    assert "ix_provider_traces_org_error_created" in plans["error"], plans["error"]
    for plan in plans.values():
        assert "TEMP B-TREE" not in plan, plan  # read in index order: no sort of the matches

    settings = make_settings(tmp_path, admin_listen="127.0.0.1:0")
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        assert gw.server.admin is not None
        base = f"http://127.0.0.1:{gw.server.admin.port}"
        timings: dict[str, float] = {}
        for name, params in (
            ("all", {}),
            ("model", {"model": "model-3"}),
            ("error", {"error_type": "UPSTREAM_UNAVAILABLE"}),
            ("status", {"status": "error"}),
        ):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                async with http.get(f"{base}/traces", params=params) as r:
                    body = await r.text()
                    assert r.status == 200
                best = min(best, time.perf_counter() - started)
            assert body.count('class="trace-row') == 50, name
            assert 'id="next-page"' in body
            timings[name] = best
        # The next page through the cursor, too.
        async with http.get(f"{base}/api/traces", params={"model": "model-3"}) as r:
            first = await r.json()
        started = time.perf_counter()
        async with http.get(f"{base}/traces", params={"model": "model-3", "page": first["next_page"]}) as r:
            assert r.status == 200
        timings["next page"] = time.perf_counter() - started
    print("list page timings (s):", {k: round(v, 4) for k, v in timings.items()})
    for name, seconds in timings.items():
        assert seconds < 0.2, (name, timings)
