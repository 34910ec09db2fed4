"""Routing micro-benchmark: the CPU the routing layer adds to one request (issue 16's budget:
at most 20 us over a direct call, a route of three deployments, no failures).

Run: `python -m bench.routing_bench [--iterations 20000] [--rounds 5]`; prints a table row.

Both paths call the same in-process host, which does a fixed amount of work standing for the
gateway's call (it builds the answer and, for a routed attempt, fills the trace's route fields
as the gateway's trace scope does). The direct path is the gateway's own entry check plus that
call; the routed path is `Router.create`: the route lookup, the weighted choice among three
healthy deployments (each with a key of the routes file), the deployment's config on the
request, the attempt record and its JSON on the trace, the answer's `deployment`. The
difference of process CPU time per request (best of `rounds`) is the routing layer's cost.
Upstream I/O is left out on purpose: it is the same on both paths and would bury 20 us in noise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from typing import Any

BUDGET_US = 20.0

ROUTES = """\
[routes.chat]
[[routes.chat.deployments]]
name = "a"
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
key = "BENCH_KEY_A"
weight = 5
context_window = 128000
[[routes.chat.deployments]]
name = "b"
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:10/v1"
key = "BENCH_KEY_B"
weight = 3
context_window = 128000
[[routes.chat.deployments]]
name = "c"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "http://127.0.0.1:11/v1"
key = "BENCH_KEY_C"
weight = 2
context_window = 200000
"""


def _requests() -> tuple[Any, Any]:
    from llmgateway.v1 import chat_pb2

    messages = [
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are a helpful agent. " * 20),
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content="What is the weather in Paris?"),
    ]
    config = chat_pb2.LLMConfig(
        model="gpt-4o-mini", model_endpoint_type="openai", context_window=128000, temperature=0.2
    )
    direct = chat_pb2.CreateRequest(llm_config=config, messages=messages)
    routed = chat_pb2.CreateRequest(
        llm_config=chat_pb2.LLMConfig(temperature=0.2), messages=messages, route="chat"
    )
    return direct, routed


class _Host:
    """The gateway's call, as fixed work: the answer, and the trace fields a routed attempt sets."""

    def __init__(self) -> None:
        from llmgateway.v1 import chat_pb2

        from server.traces.base import TraceRecord

        self._answer = chat_pb2.CreateResponse(provider_trace_id="provider_trace-bench")
        self._answer.completion.id = "chatcmpl-bench"
        self._answer.completion.usage.total_tokens = 120
        self._record_type = TraceRecord

    async def create(self, request: Any, actor: Any, deadline: Any, via: Any = None) -> Any:
        from datetime import UTC, datetime

        record = self._record_type(id="provider_trace-bench", created_at=datetime.now(UTC))
        if via is not None:
            via.annotate(record, None)
        answer = type(self._answer)()
        answer.CopyFrom(self._answer)
        return answer

    def stream(self, request: Any, actor: Any, deadline: Any, via: Any = None) -> Any:
        raise NotImplementedError


async def _per_request_us(call: Any, iterations: int, rounds: int) -> float:
    for _ in range(min(2000, iterations)):
        await call()
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(iterations):
            await call()
        best = min(best, (time.process_time() - started) / iterations)
    return best * 1e6


async def run(iterations: int, rounds: int) -> dict[str, float]:
    from server.auth.actor import Actor
    from server.config import Settings
    from server.core.retry import Deadline
    from server.routing.router import Router, wants_routing

    environ = {"BENCH_KEY_A": "sk-bench-a-" + "a" * 40, "BENCH_KEY_B": "sk-bench-b-" + "b" * 40}
    environ["BENCH_KEY_C"] = "sk-ant-bench-" + "c" * 40
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(ROUTES)
    try:
        settings = Settings(routes_file=f.name)
        router = Router.from_settings(settings, environ=environ)
    finally:
        os.unlink(f.name)
    host = _Host()
    actor = Actor(organization_id="org-bench")
    direct_request, routed_request = _requests()

    async def direct() -> None:
        deadline = Deadline.after(30.0)
        if wants_routing(direct_request):  # the gateway's entry check, on every direct call
            raise AssertionError("not routed")
        await host.create(direct_request, actor, deadline)

    async def routed() -> None:
        deadline = Deadline.after(30.0)
        if not wants_routing(routed_request):
            raise AssertionError("routed")
        response = await router.create(host, routed_request, actor, deadline)
        assert response.deployment.attempts == 1

    direct_us = await _per_request_us(direct, iterations, rounds)
    routed_us = await _per_request_us(routed, iterations, rounds)
    return {"direct_us": direct_us, "routed_us": routed_us, "routing_us": routed_us - direct_us}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing_bench", description=__doc__)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args.iterations, args.rounds))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        result = asyncio.run(run(args.iterations, args.rounds))
    verdict = "PASS" if result["routing_us"] <= BUDGET_US else "FAIL"
    print(f"{'case':<44} {'direct us':>10} {'routed us':>10} {'routing us':>11} {'budget':>7} verdict")
    print(
        f"{'route of 3 deployments, no failures (CPU)':<44} {result['direct_us']:>10.1f} "
        f"{result['routed_us']:>10.1f} {result['routing_us']:>11.1f} {BUDGET_US:>7.0f} {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
