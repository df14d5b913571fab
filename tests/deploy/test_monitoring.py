"""The Grafana provisioning files are in Grafana's format and point where compose mounts them,
the dashboard's queries name only metrics the gateway exports, and Prometheus scrapes the
gateway's metrics port."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics
from shared.bus import DropCounter
from shared.messages import ClusterStatus, SLOCount, SpecCounts, WorkerStatus

DEPLOY = Path(__file__).parents[2] / "deploy"
GRAFANA = DEPLOY / "grafana"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "slo_class", "served", "outcome",
                "worker", "verdict"}


class Link:
    """What the gateway's metrics read of its planner link, with every cluster figure present."""

    resubmitted = preempted = open_requests = 1
    drops = DropCounter()
    status = ClusterStatus(
        [WorkerStatus("w", "decode", True, 10, 5, 1)], 1, 1, 1, 0, speculation={"coding": SpecCounts(4, 2, 1)},
        handovers=1, parked=1, preemptions=1, attainment={"coding": SLOCount(1, 1)},
        promises={"promised": SLOCount(1, 1)}, caught_up=1)


def exported() -> set[str]:
    metrics = GatewayMetrics(Link())  # type: ignore[arg-type]
    metrics.ttft.labels("coding").observe(0.1)
    metrics.tpot.labels("coding").observe(0.01)
    metrics.verdict.labels("refused").observe(0.002)
    metrics.requests.labels("chat", "200").inc()
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "slos-serve.json").read_text())


def test_dashboard_is_in_grafanas_model() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in dash["panels"]:
        assert panel["type"] == "timeseries" and panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "prometheus"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))


def test_dashboard_queries_name_exported_metrics() -> None:
    names = exported()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            words = set(re.findall(r"[a-z_]+(?![a-z_]*\")", re.sub(r"\[\w+\]|\"[^\"]*\"", "", expr)))
            for word in words - PROMQL_WORDS:
                assert word in names, f"{panel['title']}: {word} is not exported"


def test_the_check_catches_a_misnamed_metric() -> None:
    assert "slos_kv_handovers_total" in exported() and "slos_kv_handovers" not in exported()


def test_provisioning_matches_the_compose_mounts() -> None:
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "slos-serve.yml").read_text())
    assert provider["apiVersion"] == 1
    (files,) = provider["providers"]
    assert files["type"] == "file"
    volumes = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["grafana"]["volumes"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in volumes)
    assert mounts["./grafana/dashboards"] == files["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_scrapes_the_gateway() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["gateway:8000"]
