"""deploy/ cannot run here (no container engine), so it is read: every environment name is a real
setting of the server (read from server/config.py), Kubernetes and compose agree with each other
and with the loopback scale-out test, and the balancer and client configs fit the server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from grpc_health.v1 import health_pb2
from llmgateway.v1 import chat_pb2, providers_pb2, traces_pb2

from server import config
from server.app import MAX_MESSAGE_BYTES
from tests.scaleout import LOCAL_OVERRIDES, compose_gateway_environment, replica_environment

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def server_variables() -> set[str]:
    """Every environment name the server reads, from server/config.py itself."""
    names = {"LLMGW_" + name.upper() for name in config._configurable_fields()}
    names |= {"LLMGW_" + name.upper() for name in config._retry_setting_names()}
    names |= {v for variables in config._PROVIDER_KEYS.values() for v in variables}
    names |= {v for variables in config._ALIASES.values() for v in variables}
    return names


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for document in yaml.safe_load_all((DEPLOY / "kubernetes" / "llm-gateway.yaml").read_text()):
        by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def k8s_container() -> dict[str, Any]:
    (deployment,) = k8s_documents()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def k8s_env() -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in k8s_container()["env"]}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def gateway_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name.startswith("gateway-")}


def test_every_environment_name_is_a_real_setting() -> None:
    known = server_variables()
    assert "LLMGW_GRPC_MAX_CONNECTION_AGE" in known and "OPENAI_API_KEY" in known  # the reader works
    sources = {"kubernetes": set(k8s_env())}
    for name, service in gateway_services().items():
        sources[f"compose {name}"] = set(service["environment"])
    for source, names in sources.items():
        unknown = sorted(names - known)
        assert not unknown, f"{source}: not settings of the server: {unknown}"


def test_kubernetes_compose_and_the_loopback_test_run_the_same_settings() -> None:
    services = gateway_services()
    assert len(services) == 3
    environments = [dict(s["environment"]) for s in services.values()]
    assert all(env == environments[0] for env in environments)  # one anchor, three replicas
    composed = compose_gateway_environment()
    kubernetes = k8s_env()
    assert set(kubernetes) == set(composed)
    for name, entry in kubernetes.items():
        if "value" in entry:
            assert entry["value"] == composed[name], name
    # The loopback test: every value but addresses and secrets exactly as deployed.
    loopback = replica_environment(
        postgres_dsn="postgresql://u:p@127.0.0.1:5432/db",
        encryption_key="k",
        allowed_endpoints=["http://x/v1"],
    )
    for name, value in composed.items():
        if name.startswith("LLMGW_") and name not in LOCAL_OVERRIDES:
            assert loopback[name] == value, name
    config.load_settings(environ=loopback)  # and the server accepts them


def test_deployments_require_gateway_keys() -> None:
    """Behind a balancer `auto` is a trap: a replica listening on loopback behind a proxy on the
    same host would serve everyone as the anonymous admin. The deployments say `required`."""
    assert compose_gateway_environment()["LLMGW_AUTH"] == "required"
    assert k8s_env()["LLMGW_AUTH"]["value"] == "required"


def test_secrets_come_from_a_secret_never_a_literal() -> None:
    secret_names = {"LLMGW_" + f.upper() for f in config.SECRET_FIELDS} | {
        v for variables in config._PROVIDER_KEYS.values() for v in variables
    }
    with_credentials = {"LLMGW_POSTGRES_DSN", "LLMGW_CLICKHOUSE_URL", "LLMGW_REDIS_URL"}
    for name, entry in k8s_env().items():
        if name in secret_names | with_credentials:
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} is not read from a Secret"
            assert "value" not in entry, name
    for name, value in compose_gateway_environment().items():
        if name in secret_names | with_credentials:
            assert "${" in value, f"compose {name} holds a literal instead of a variable"
    # No Secret (with values) is checked in.
    assert "Secret" not in k8s_documents()


def test_kubernetes_deployment_is_probed_bounded_and_unprivileged() -> None:
    documents = k8s_documents()
    (deployment,) = documents["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = k8s_container()
    port = container["ports"][0]["containerPort"]
    assert k8s_env()["LLMGW_LISTEN"]["value"].endswith(f":{port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The kill timeout outlasts the drain's worst case (README, Operating it), preStop included.
    grace = float(k8s_env()["LLMGW_GRACE_PERIOD"]["value"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace + 4 + max(grace, 5) + 5 * 2
    compose_stop = float(compose()["x-gateway"]["stop_grace_period"].rstrip("s"))
    assert compose_stop > grace + 4 + max(grace, 5) + 5 * 2
    # Services and the PodDisruptionBudget select the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    for service in documents["Service"]:
        assert service["spec"]["selector"] == labels
        assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    (budget,) = documents["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def _methods() -> dict[str, set[str]]:
    services = {}
    for module in (chat_pb2, traces_pb2, providers_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            services[service.full_name] = {m.name for m in service.methods}
    return services


def test_the_client_service_config_retries_only_idempotent_methods_that_exist() -> None:
    service_config = json.loads((DEPLOY / "grpc-service-config.json").read_text())
    methods = _methods()
    # Running these twice runs a model (and bills it) twice, or changes state twice.
    never_retried = {
        ("llmgateway.v1.ChatCompletionService", "Create"),
        ("llmgateway.v1.ChatCompletionService", "StreamCreate"),
        ("llmgateway.v1.ProviderService", "CreateProvider"),
        ("llmgateway.v1.ProviderService", "DeleteProvider"),
    }
    named = []
    for method_config in service_config["methodConfig"]:
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        for name in method_config["name"]:
            assert "method" in name, f"a whole service is retried: {name}"
            assert name["method"] in methods[name["service"]], name
            named.append((name["service"], name["method"]))
    assert not set(named) & never_retried
    assert ("llmgateway.v1.ChatCompletionService", "CountTokens") in named


def _nginx_seconds(text: str, directive: str) -> float:
    match = re.search(rf"^\s*{directive}\s+(\d+)s;", text, re.MULTILINE)
    assert match, directive
    return float(match.group(1))


def test_the_balancer_outwaits_a_slow_first_token_and_takes_the_biggest_request() -> None:
    snippet = (DEPLOY / "nginx" / "grpc-proxy.conf").read_text()
    upstream_timeout = float(compose_gateway_environment()["LLMGW_UPSTREAM_TIMEOUT"])
    assert _nginx_seconds(snippet, "grpc_read_timeout") > upstream_timeout
    assert _nginx_seconds(snippet, "grpc_send_timeout") > upstream_timeout
    body = re.search(r"client_max_body_size\s+(\d+)m;", snippet)
    assert body and int(body.group(1)) * 1024 * 1024 >= MAX_MESSAGE_BYTES
    # A call that reached a replica is never sent again by the balancer.
    assert "non_idempotent" not in re.sub(r"#.*", "", snippet)
    # The compose balancer includes the same file the scale-out test includes.
    volumes = compose()["services"]["balancer"]["volumes"]
    assert any(v.startswith("./nginx/grpc-proxy.conf:") for v in volumes)
    assert "include /etc/nginx/llm-gateway/grpc-proxy.conf;" in (DEPLOY / "nginx" / "nginx.conf").read_text()


def test_replicas_share_their_keys_limits_and_cooldowns() -> None:
    """Every replica keeps keys in PostgreSQL and limits and cooldowns in Redis (issue 19 point 1)."""
    compose_env, k8s = compose_gateway_environment(), k8s_env()
    assert compose_env["LLMGW_KEY_STORE"] == "postgres" and k8s["LLMGW_KEY_STORE"]["value"] == "postgres"
    assert compose_env["LLMGW_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert k8s["LLMGW_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    # Every key the Deployment reads from the Secret is in the `kubectl create secret` comment.
    text = (DEPLOY / "kubernetes" / "llm-gateway.yaml").read_text()
    documented = set(re.findall(r"--from-literal=([a-z0-9-]+)=", text))
    refs = [e["valueFrom"]["secretKeyRef"] for e in k8s.values() if "valueFrom" in e]
    required = {r["key"] for r in refs if not r.get("optional")}
    assert required <= documented, required - documented
