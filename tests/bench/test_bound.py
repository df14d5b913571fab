"""The upper bound on capacity: the GPU time it says serving requests takes at least is never
more than the simulated workers spend on them, for every scenario and policy; and the rate it
gives is one no policy sustains."""

from __future__ import annotations

import dataclasses

import pytest

from bench.bound import cheapest_share, request_costs, upper_bound
from bench.experiments import BLOCK_SIZE, Variant, Window, bound, kv_blocks, setup
from bench.simulator import simulate
from bench.workloads import SCENARIOS, TRACES, Arrival, every_request, scenario
from planner.policies.registry import POLICY_NAMES
from shared.roofline import SHIPPED_PROFILES, load_profile
from shared.slo import DEFAULT_CLASSES

A100 = load_profile(SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json")
KV_TOKENS = kv_blocks(A100) * BLOCK_SIZE
RATES = {"chatbot": 20.0, "coding": 40.0, "summarization": 3.0, "mixed": 8.0, "tool_calling": 1.0,
         "reasoning": 2.0}


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_the_workers_spend_at_least_the_time_the_bound_prices_what_they_finish(name: str, policy: str) -> None:
    if name in {"chatbot", "coding", "summarization", "mixed"} and not TRACES.is_dir():
        pytest.skip(f"public traces not at {TRACES}")
    s = setup(policy, A100, 2)
    arrivals = scenario(name, A100, RATES[name], 10.0, seed=1)
    result = simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES, seed=1)
    finished = {o.request_id for o in result.outcomes if o.finished}
    served = [dataclasses.replace(a, then=None) for a in every_request(arrivals) if a.request_id in finished]
    assert len(served) >= 10
    fixed, compute, memory = request_costs(A100, served, KV_TOKENS)
    least = max(cheapest_share(fixed + compute, 1.0), cheapest_share(fixed + memory, 1.0))
    assert result.busy_s >= least


def test_the_bound_lets_the_costliest_tenth_go_and_charges_for_a_small_cache() -> None:
    long = Arrival("long", 0.0, 4000, 2000, "chatbot")
    short = [Arrival(f"s{i}", 0.0, 200, 100, "chatbot") for i in range(9)]
    everyone = upper_bound(A100, [long, *short], KV_TOKENS, share=1.0)
    assert upper_bound(A100, [long, *short], KV_TOKENS) == pytest.approx(upper_bound(A100, short, KV_TOKENS) * 10 / 9)
    assert upper_bound(A100, [long, *short], KV_TOKENS) > everyone
    assert upper_bound(A100, [long, *short], KV_TOKENS // 100, share=1.0) < everyone
    loop = Arrival("t.0", 0.0, 1000, 100, "tool_calling", then=Arrival("t.1", 0.5, 1000, 100, "tool_calling"))
    one = Arrival("a", 0.0, 1000, 100, "chatbot")
    assert upper_bound(A100, [loop], KV_TOKENS, 1.0) == pytest.approx(upper_bound(A100, [one, one], KV_TOKENS, 1.0) / 2)


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"public traces not at {TRACES}")
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_no_policy_meets_the_target_above_the_bound(policy: str) -> None:
    window = Window(seconds=60.0, arrivals=0)
    per_gpu = bound("summarization", A100, window, Variant(), seed=2)
    s = setup(policy, A100, 2)
    arrivals = scenario("summarization", A100, 1.1 * per_gpu * s.gpus, window.seconds, seed=2)
    assert simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES, seed=2, stop_below=0.9).attainment < 0.9
