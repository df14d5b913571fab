"""Each Kubernetes overlay renders with kustomize and every manifest validates against the
Kubernetes schemas offline; the overlays wire what the processes need."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).parents[2] / "deploy" / "k8s"
OVERLAYS = ("colocated", "disaggregated", "gpu")
VERSION = "1.32.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (Debian's kubernetes-client) is "
                                "not installed")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def containers(docs: list[dict], name: str) -> list[dict]:
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
    return deployment["spec"]["template"]["spec"]["containers"]


def env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates(overlay: str) -> None:
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    doc = render("colocated")[-1]
    doc["spec"]["replicas"] = "two" if doc["kind"] == "Deployment" else doc["spec"].get("replicas")
    doc["spec"]["no_such_field"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_probes_and_bind_addresses(overlay: str) -> None:
    docs = render(overlay)
    planner, = containers(docs, "slos-serve-planner")
    gateway, = containers(docs, "slos-serve-gateway")
    assert env(planner)["SLOS_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "slos-serve-secrets", "key": "admin-token"}}
    assert env(gateway)["SLOS_API_KEY"] == {"secretKeyRef": {"name": "slos-serve-secrets", "key": "api-key"}}
    assert not any(d["kind"] == "Secret" for d in docs)  # created by the operator, never a default
    for c in (planner, gateway):  # a Service's virtual IP cannot be bound: bind the pod's own
        assert env(c)["SLOS_BUS_BIND_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert c["readinessProbe"] and c["livenessProbe"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    config = next(d for d in docs if d["metadata"]["name"] == "slos-serve-env")["data"]
    assert config["SLOS_MODE"] == ("colocated" if overlay == "colocated" else "disaggregated")
    roles = {"colocated": ["worker"], "disaggregated": ["prefill", "decode"], "gpu": ["prefill", "decode"]}[overlay]
    cluster_secret = {"secretKeyRef": {"name": "slos-serve-secrets", "key": "cluster-secret"}}
    assert env(planner)["SLOS_CLUSTER_SECRET"] == env(gateway)["SLOS_CLUSTER_SECRET"] == cluster_secret
    for role in roles:
        worker, = containers(docs, f"slos-serve-{role}")
        assert env(worker)["SLOS_CLUSTER_SECRET"] == cluster_secret
        assert worker["args"] == ["worker", "--role", "colocated" if role == "worker" else role]
        assert env(worker)["SLOS_KV_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        gpus = worker["resources"]["requests"].get("nvidia.com/gpu")
        assert (gpus == "1") == (overlay == "gpu")
        if overlay == "gpu":
            assert env(worker)["SLOS_DEVICE"] == "cuda" and env(worker)["SLOS_KV_CACHE_MB"] == "16384"
    gateway_pod = next(d for d in docs if d["metadata"]["name"] == "slos-serve-gateway" and d["kind"] == "Deployment")
    assert gateway_pod["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_slo_classes_in_the_config_map_load() -> None:
    import tomllib

    from shared.settings import Settings

    config = next(d for d in render("colocated") if d["metadata"]["name"] == "slos-serve-config")
    classes = Settings(**tomllib.loads(config["data"]["slos-serve.toml"])).slo_classes
    assert classes["reasoning"].resolved().target.stages[0].tpot_ms == 50
    assert set(classes) == set(Settings().slo_classes)
