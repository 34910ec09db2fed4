"""SQLite trace writer throughput: push records through `TraceWriter` into a fresh database file.

Run: `python -m bench.traces_bench --records 50000 --path /tmp/x.db`; prints one JSON line with
traces/s (wall, first enqueue to everything committed) and CPU microseconds per trace.
Records are enqueued no faster than the writer's queue bound allows, so none is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from bench.workload import openai_body


async def _run(records: int, path: str) -> dict[str, float]:
    from server.traces.base import TraceRecord, new_trace_id
    from server.traces.sqlite import SQLiteTraceBackend
    from server.traces.writer import TraceWriter

    request_json = openai_body(stream=False).decode()
    response_json = json.dumps(
        {
            "id": "chatcmpl-1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 300}}],
        }
    )
    backend = SQLiteTraceBackend(path)
    writer = TraceWriter([backend])
    await writer.start()
    room = writer.queue_size - writer.batch_size
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    pushed = 0
    while pushed < records:
        if writer.stats[0].queued >= room:
            await asyncio.sleep(0.0005)
            continue
        for _ in range(min(writer.batch_size, records - pushed)):
            writer.enqueue(
                TraceRecord(
                    id=new_trace_id(),
                    created_at=datetime.now(UTC),
                    organization_id="org-bench",
                    user_id="user-bench",
                    step_id=f"step-{pushed}",
                    agent_id="agent-bench",
                    run_id="run-bench",
                    provider="openai",
                    model="gpt-4o-mini",
                    model_endpoint_type="openai",
                    request_json=request_json,
                    response_json=response_json,
                    prompt_tokens=212,
                    completion_tokens=40,
                    total_tokens=252,
                    latency_ms=1.0,
                )
            )
            pushed += 1
        await asyncio.sleep(0)
    await writer.flush(timeout=300)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stats = writer.stats[0]
    await writer.close()
    return {
        "records": records,
        "written": stats.written,
        "dropped": stats.dropped,
        "wall": wall,
        "traces_per_s": stats.written / wall if wall else 0.0,
        "cpu_us_per_trace": cpu / records * 1e6 if records else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traces_bench")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--path", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_run(args.records, args.path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
