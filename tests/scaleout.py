"""Several real gateway processes behind a real nginx (`grpc_pass`), sharing a real PostgreSQL.

`start_cluster` starts N `llm-gateway serve` processes on loopback with the settings of the
checked-in deployment (deploy/compose.yaml's gateway environment; only addresses and secrets
differ, see `LOCAL_OVERRIDES`), and nginx with deploy/nginx/grpc-proxy.conf included as is and
the upstream parameters of deploy/nginx/nginx.conf (`compose_upstream`).
nginx's access log records, per call, the `x-call-id` the client sent and the replica(s) nginx
used, so a test can tell which replica served which call.

`start_cluster(..., redis_url=...)` gives every replica the same Redis (`LLMGW_REDIS_URL`:
shared limits and routing cooldowns); the compose file's `LLMGW_KEY_STORE=postgres` comes
through as deployed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.process_harness import REPO_ROOT, ServerProcess, clean_env, start_server_process
from tests.trace_services import free_port

DEPLOY = REPO_ROOT / "deploy"
NGINX_BIN = Path("/usr/sbin/nginx")
SERVICE_CONFIG = DEPLOY / "grpc-service-config.json"
# deploy/compose.yaml's variables whose values are addresses or secrets of that deployment; the
# loopback cluster sets its own. Every other LLMGW_* value is used exactly as deployed.
LOCAL_OVERRIDES = frozenset(
    {
        "LLMGW_LISTEN",
        "LLMGW_POSTGRES_DSN",
        "LLMGW_CLICKHOUSE_URL",
        "LLMGW_REDIS_URL",
        "LLMGW_TRACE_BACKENDS",  # postgres here; the compose file also writes to ClickHouse
        "LLMGW_ENCRYPTION_KEY",
        "LLMGW_ALLOWED_ENDPOINTS",
        "LLMGW_SQLITE_PATH",
    }
)

_ACCESS_LINE = re.compile(r'(\S+) (\S+) (\S+) "([^"]*)" (\d+) "[^"]*"')
_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format calls '$msec $request_time $http_x_call_id "$upstream_addr" $status "$upstream_status"';
    access_log {workdir}/access.log calls;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream llm_gateway {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_timeout 300s;
        include {snippet};
    }}
}}
"""


def compose_upstream() -> tuple[str, list[str]]:
    """deploy/nginx/nginx.conf's upstream block: the parameters of its `server` lines (all the
    same) and its other directives (`keepalive`), which the loopback balancer uses too."""
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    block = re.search(r"upstream llm_gateway \{(.*?)\n    \}", text, re.DOTALL)
    assert block, "deploy/nginx/nginx.conf has no `upstream llm_gateway` block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    lines = [line for line in lines if line]
    parameters = {line.split(None, 2)[2].rstrip(";") for line in lines if line.startswith("server ")}
    assert len(parameters) == 1, f"the replicas' server lines differ: {parameters}"
    return parameters.pop(), [f"        {line}" for line in lines if not line.startswith("server ")]


def compose_gateway_environment() -> dict[str, str]:
    """The environment of the compose file's first gateway replica (names and values as written)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    environment = compose["services"]["gateway-1"]["environment"]
    return {str(k): str(v) for k, v in environment.items()}


def replica_environment(
    *, postgres_dsn: str, encryption_key: str, allowed_endpoints: Sequence[str], redis_url: str | None = None
) -> dict[str, str]:
    """The deployed gateway environment with this machine's addresses and secrets."""
    env = {k: v for k, v in compose_gateway_environment().items() if k not in LOCAL_OVERRIDES}
    # Provider keys of the deployment (`${OPENAI_API_KEY:-}`) are not set here.
    env = {k: v for k, v in env.items() if k.startswith("LLMGW_")}
    env.update(
        LLMGW_POSTGRES_DSN=postgres_dsn,
        LLMGW_TRACE_BACKENDS="postgres",
        LLMGW_ENCRYPTION_KEY=encryption_key,
        LLMGW_ALLOWED_ENDPOINTS=",".join(allowed_endpoints),
    )
    if redis_url is not None:
        env["LLMGW_REDIS_URL"] = redis_url
    return env


@dataclass(frozen=True, slots=True)
class BalancedCall:
    """One line of nginx's access log: a call and the replicas nginx sent it to."""

    call_id: str
    started: float  # wall clock (time.time())
    ended: float
    upstreams: tuple[str, ...]  # in the order nginx tried them
    status: int


@dataclass
class Balancer:
    """nginx as a gRPC balancer, started from a temp prefix directory."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def calls(self) -> dict[str, BalancedCall]:
        """call id -> what nginx logged about it (written when the call ended)."""
        calls = {}
        for line in (self.workdir / "access.log").read_text().splitlines():
            match = _ACCESS_LINE.fullmatch(line)
            assert match, f"unexpected nginx access log line: {line!r}"
            msec, duration, call_id, upstream, status = match.groups()
            addresses = tuple(a.strip() for a in upstream.split(",") if a.strip())
            ended = float(msec)
            calls[call_id] = BalancedCall(call_id, ended - float(duration), ended, addresses, int(status))
        return calls

    def log(self) -> str:
        try:
            return (self.workdir / "error.log").read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: in-flight requests finish
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_nginx(workdir: Path, upstreams: Sequence[str], timeout: float = 10.0) -> Balancer:
    """nginx on a free loopback port in front of `upstreams`, with deploy/nginx/grpc-proxy.conf."""
    if not NGINX_BIN.exists():
        raise AssertionError(f"{NGINX_BIN} is missing: run scripts/install-test-services")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    parameters, directives = compose_upstream()
    servers = "\n".join([*(f"        server {u} {parameters};" for u in upstreams), *directives])
    conf = workdir / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            workdir=workdir, port=port, servers=servers, snippet=DEPLOY / "nginx" / "grpc-proxy.conf"
        )
    )
    process = subprocess.Popen(
        [str(NGINX_BIN), "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    balancer = Balancer(workdir, port, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited {process.returncode}:\n{balancer.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return balancer
        except OSError:
            if time.monotonic() > deadline:
                balancer.stop()
                raise AssertionError(f"nginx not listening after {timeout} s:\n{balancer.log()}") from None
            time.sleep(0.05)


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    balancer: Balancer
    env: dict[str, str]
    workdir: Path
    stopped: set[int] = field(default_factory=set)

    def service_config(self) -> str:
        return SERVICE_CONFIG.read_text()

    def direct_target(self) -> str:
        """All replicas as one target for client-side balancing (round_robin in the service config)."""
        return "ipv4:" + ",".join(r.address for r in self.replicas)

    def cli(self, *args: str) -> str:
        """`llm-gateway <args>` against the cluster's store; its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "server", *args],
            cwd=REPO_ROOT,
            env=clean_env(self.env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"llm-gateway {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result.stdout

    def create_key(self, org: str, *, admin: bool = False) -> tuple[str, str]:
        """(key_id, key) made with the CLI, as an operator does."""
        out = self.cli("keys", "create", "--org", org, *(["--admin"] if admin else []))
        key = out.strip().splitlines()[-1]
        return key.split("_")[1], key

    def logs(self) -> str:
        return "\n".join(f"--- replica {i}:\n{r.log[-3000:]}" for i, r in enumerate(self.replicas))


async def start_cluster(
    workdir: Path,
    *,
    replicas: int,
    postgres_dsn: str,
    allowed_endpoints: Sequence[str],
    redis_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Cluster:
    """`replicas` gateway processes (started in parallel) and nginx in front of them."""
    env = replica_environment(
        postgres_dsn=postgres_dsn,
        encryption_key="scale-test-passphrase-" + os.urandom(8).hex(),
        allowed_endpoints=allowed_endpoints,
        redis_url=redis_url,
    )
    env.update(extra_env or {})

    def start(i: int) -> ServerProcess:
        home = workdir / f"replica-{i}"
        home.mkdir(parents=True, exist_ok=True)
        return start_server_process(home, env=env)

    started = await asyncio.gather(
        *(asyncio.to_thread(start, i) for i in range(replicas)), return_exceptions=True
    )
    processes = [s for s in started if isinstance(s, ServerProcess)]
    failures = [s for s in started if isinstance(s, BaseException)]
    if failures:
        for p in processes:
            p.close()
        raise failures[0]
    try:
        balancer = await asyncio.to_thread(start_nginx, workdir / "nginx", [p.address for p in processes])
    except BaseException:
        for p in processes:
            p.close()
        raise
    return Cluster(processes, balancer, env, workdir)


async def stop_cluster(cluster: Cluster) -> list[int]:
    """SIGTERM every replica still running (their exit codes), then stop nginx.

    A replica that does not exit in time fails the test, but the other replicas and nginx are
    stopped all the same: left running, they outlived the test and failed a later one (a
    ResourceWarning for the leaked nginx)."""
    codes = []
    try:
        for replica in cluster.replicas:
            if replica.process.poll() is None:
                try:
                    codes.append(await asyncio.to_thread(replica.stop))
                except BaseException:
                    for other in cluster.replicas:
                        other.close()
                    raise
            else:
                replica.close()
    finally:
        await asyncio.to_thread(cluster.balancer.stop)
    assert all(code == 0 for code in codes), f"replicas exited {codes} on SIGTERM:\n{cluster.logs()}"
    return codes


def retrying_channel_options(service_config: str) -> list[tuple[str, object]]:
    """Client options: the checked-in service config (retries of idempotent RPCs) and retries on."""
    json.loads(service_config)  # fail early on a broken file
    return [("grpc.service_config", service_config), ("grpc.enable_retries", 1)]
