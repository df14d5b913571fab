"""The capacity search: it finds a known threshold, and on a tiny simulated trace the rate it
returns meets the target while a higher one it tried does not."""

from __future__ import annotations

import pytest

from bench.capacity import TARGET, capacity
from bench.experiments import setup
from bench.simulator import simulate
from bench.workloads import TRACES, scenario
from shared.roofline import SHIPPED_PROFILES, load_profile
from shared.slo import DEFAULT_CLASSES


@pytest.mark.parametrize("start", [0.3, 7.0, 100.0])
def test_finds_a_known_threshold_from_any_start(start: float) -> None:
    found = capacity(lambda rate: 1.0 if rate <= 5.0 else 0.5, start, splits=8)
    assert 4.8 <= found.capacity <= 5.0
    assert capacity(lambda rate: 0.0, 1.0).capacity == 0.0


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"public traces not at {TRACES}")
def test_capacity_of_a_tiny_trace_in_the_simulator() -> None:
    profile = load_profile(SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json")
    s = setup("slos", profile, gpus=1)

    def attainment_at(rate: float) -> float:
        arrivals = scenario("coding", profile, rate, 4.0, seed=0)
        return simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES).attainment

    found = capacity(attainment_at, start=8.0, splits=2)
    assert found.capacity > 0
    met = dict(found.probes)
    assert met[found.capacity] >= TARGET
    assert any(rate > found.capacity and share < TARGET for rate, share in found.probes)
