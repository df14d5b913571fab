"""The promises experiment's reading of the gateway's verdict histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.promises import verdict_bounds
from gateway.metrics import VERDICT_BUCKETS


def test_verdict_bounds_are_the_buckets_holding_the_median_and_the_99th_percentile() -> None:
    registry = CollectorRegistry()
    verdict = Histogram("slos_verdict_seconds", "", ["verdict"], buckets=VERDICT_BUCKETS, registry=registry)
    for _ in range(98):
        verdict.labels("refused").observe(0.003)
    verdict.labels("refused").observe(0.2)
    verdict.labels("refused").observe(0.7)  # the 100th: beyond the 99th percentile
    verdict.labels("promised").observe(0.04)
    assert verdict_bounds(generate_latest(registry).decode()) == {"refused": (0.005, 0.25), "promised": (0.05, 0.05)}
