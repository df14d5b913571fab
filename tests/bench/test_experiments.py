"""The evaluation's pieces: knobs reach the policies they tune, the grid holds Sarathi-Serve's
own rule and every DistServe split, each with and without speculation, intervals are Student's,
and ratios are taken seed by seed against the baseline with the best mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.experiments import SPEC_LENS, CapacityRow, Knobs, Variant, interval, knob_grid, sarathi_budget, setup
from bench.simulator import simulate
from bench.workloads import every_request, scenario
from shared.roofline import SHIPPED_PROFILES, Batches, load_profile
from shared.slo import DEFAULT_CLASSES

A100 = load_profile(SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json")


def test_knobs_reach_the_policies_and_the_split() -> None:
    assert setup("sarathi", A100, 2, Knobs(budget=256)).make().max_batch_tokens == 256
    assert setup("edf", A100, 2, Knobs(budget=128, max_seqs=32)).make().max_num_seqs == 32
    assert setup("fcfs", A100, 2, Knobs(budget=8192)).make().max_batch_tokens == 8192
    assert setup("sarathi", A100, 2).make().max_batch_tokens == 512  # as usually deployed
    split = setup("distserve", A100, 4, Knobs(prefill_gpus=1)).cluster
    assert (split.prefill, split.decode) == (1, 3)
    assert setup("distserve", A100, 4).cluster.prefill == 2
    assert setup("slos", A100, 3).gpus == 3


def test_sarathi_serves_rule_is_the_largest_chunk_within_the_tbt() -> None:
    tpot = 0.05
    budget = sarathi_budget(A100, tpot)

    def step(n: int) -> float:
        return float(A100.predict(Batches.of(prefill_tokens=n, num_seqs=1, kv_read=n, attention_pairs=n * n / 2)))

    assert step(budget) <= tpot < step(budget + 1)
    grid = knob_grid("sarathi", A100, 2, tpot)
    assert Knobs(budget=budget) in grid and Knobs(budget=64) in grid and Knobs(budget=4096) in grid
    assert {k.prefill_gpus for k in knob_grid("distserve", A100, 4, tpot)} == {1, 2, 3}
    for policy in ("fcfs", "sarathi", "edf", "distserve"):
        for quick in (False, True):
            grid = knob_grid(policy, A100, 2, tpot, quick)
            assert {k.spec_len for k in grid} == set(SPEC_LENS) and len(grid) == len(set(grid))


@pytest.mark.parametrize("policy", ["sarathi", "distserve"])
def test_a_baseline_given_a_speculative_length_speculates(policy: str) -> None:
    """The speculation knob reaches a baseline's decode steps (on DistServe, its decode pool):
    coding's outputs, accepted at 0.6 a token, come out faster a token than without."""
    arrivals = scenario("coding", A100, 20.0, 10, 0, False)

    def tpot_p50(spec_len: int) -> float:
        s = setup(policy, A100, 2, Knobs(spec_len=spec_len))
        outcomes = simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES).outcomes
        return float(np.median([t for o in outcomes for t in o.tpots_s if t]))

    assert setup(policy, A100, 2, Knobs(spec_len=4)).make().spec_len == 4
    assert tpot_p50(4) < 0.8 * tpot_p50(0)


def test_intervals_are_students() -> None:
    mean, lo, hi = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(interval([5.0])[1])


def test_ratios_are_against_the_best_baseline_seed_by_seed() -> None:
    row = CapacityRow("x", {"slos": [4.0, 6.0], "fcfs": [1.0, 1.0], "sarathi": [2.0, 3.0]}, {}, 10.0)
    assert row.best_baseline == "sarathi" and row.ratios() == [2.0, 2.0]
    assert row.ratios("slos", "fcfs") == [4.0, 6.0]


def test_a_variant_sets_every_calls_acceptance() -> None:
    arrivals = Variant(acceptance=0.3).arrivals("tool_calling", A100, 1.0, 10.0, seed=1)
    calls = every_request(arrivals)
    assert len(calls) > len(arrivals) and {c.alpha for c in calls} == {0.3}
