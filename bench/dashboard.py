"""Render the Grafana dashboard's panels to one PNG from a Prometheus server: each panel's own
queries over a time range, laid out on the dashboard's grid. For the docs, where no Grafana
runs; it checks the dashboard's PromQL against a real Prometheus as a side effect."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "dashboards" / "slos-serve.json"


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The matrix Prometheus returns for `expr`; raises on a query it rejects."""
    reply = httpx.get(f"{prometheus}/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step}, timeout=30).json()
    if reply.get("status") != "success":
        raise ValueError(f"{expr}: {reply.get('error')}")
    return reply["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(prometheus: str, out: Path, minutes: float, dashboard: Path = DASHBOARD) -> int:
    """Write the PNG; returns how many series it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(dashboard.read_text())["panels"]
    end = time.time()
    start, step = end - minutes * 60, max(1.0, minutes * 60 / 300)
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    drawn = 0
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in query_range(prometheus, target["expr"], start, end, step):
                t, v = zip(*((float(ts) - end, float(val)) for ts, val in series["values"]), strict=True)
                ax.plot([x / 60 for x in t], v, label=legend(target.get("legendFormat", ""), series["metric"]))
                drawn += 1
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("minutes ago", fontsize=8)
        ax.set_ylabel({"s": "seconds", "percentunit": "share", "reqps": "requests/s", "ops": "per s"}.get(unit, ""),
                      fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"slos-serve dashboard, rendered from Prometheus ({minutes:g} minutes)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return drawn
