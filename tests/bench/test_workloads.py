"""Scenarios: the same requests for the same seed, the asked rate on average, bursts that
keep it, objectives scaled to the hardware, and tool loops as chains of calls."""

from __future__ import annotations

import numpy as np
import pytest

from bench.workloads import (
    SCENARIOS,
    TRACES,
    Arrival,
    Outcome,
    arrival_times,
    idle_latency,
    judge_loops,
    scenario,
)
from shared.roofline import SHIPPED_PROFILES, load_profile

A100 = load_profile(SHIPPED_PROFILES / "a100-80gb_llama-2-7b.json")
H100 = load_profile(SHIPPED_PROFILES / "h100-sxm_llama-2-7b.json")
TRACED = {"chatbot", "coding", "summarization", "mixed"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenarios_are_deterministic_and_scaled_to_the_hardware(name: str) -> None:
    if name in TRACED and not TRACES.is_dir():
        pytest.skip(f"public traces not at {TRACES}")
    a = scenario(name, A100, rate=4.0, duration_s=20.0, seed=3)
    assert a == scenario(name, A100, rate=4.0, duration_s=20.0, seed=3)
    assert a != scenario(name, A100, rate=4.0, duration_s=20.0, seed=4)
    assert 40 <= len(a) <= 120 and all(x.at <= y.at for x, y in zip(a, a[1:]))
    first = a[0]
    prefill, decode = idle_latency(A100, first.prompt_tokens)
    assert first.ttft_ms > 1e3 * prefill and (first.tpot_ms or first.stages[0].tpot_ms) > 1e3 * decode
    faster = scenario(name, H100, rate=4.0, duration_s=20.0, seed=3)[0]
    assert faster.ttft_ms < first.ttft_ms  # the same request, tighter on faster hardware


def test_arrivals_fill_the_window_at_the_mean_rate() -> None:
    for trace in (None, "conv", "code"):
        if trace and not TRACES.is_dir():
            continue
        times = arrival_times(10.0, 300.0, np.random.default_rng(0), trace)
        assert times[-1] < 300.0 and all(np.diff(times) >= 0)
        assert len(times) == pytest.approx(3000, rel=0.25)


@pytest.mark.parametrize("duration", [60.0, 400.0])
def test_bursts_cycle_at_least_four_times_in_every_window_at_the_mean_rate(duration: float) -> None:
    times = arrival_times(10.0, duration, np.random.default_rng(0), bursty=True)
    assert len(times) / duration == pytest.approx(10.0, rel=0.1)
    cycle = min(40.0, duration / 4)
    cycles = int(duration // cycle)
    assert cycles >= 4
    for c in range(cycles):  # three times the rate in the first quarter of each cycle, a third after
        start = c * cycle
        on = np.sum((times >= start) & (times < start + cycle / 4))
        off = np.sum((times >= start + cycle / 4) & (times < start + cycle))
        assert on / (cycle / 4) > 4 * off / (cycle * 3 / 4)


def test_a_tool_loop_is_a_chain_of_calls_with_a_looser_final_answer() -> None:
    task = scenario("tool_calling", A100, rate=1.0, duration_s=5.0, seed=1)[0]
    calls = []
    while task is not None:
        calls.append(task)
        task = task.then
    assert 3 <= len(calls) <= 7
    assert all(b.prompt_tokens > a.prompt_tokens + a.output_tokens for a, b in zip(calls, calls[1:]))
    assert calls[-1].tpot_ms > calls[0].tpot_ms and calls[-1].output_tokens >= 100


def test_a_loop_is_late_from_its_first_missed_call_on() -> None:
    def call(rid: str, then: Arrival | None = None) -> Arrival:
        return Arrival(rid, 0.0, 100, 10, "tool_calling", then=then)

    def done(rid: str, met: bool) -> Outcome:
        return Outcome(rid, "tool_calling", 0.0, 100, 10, False, True, met, 0.1, [0.01])

    late = call("a0", call("a1", call("a2", call("a3"))))  # a1 misses; a2 runs well; a3 never went out
    on_time = call("b0", call("b1"))
    unsent = call("c0", call("c1"))  # its first call never went out (a run stopped early)
    single = Arrival("d", 0.0, 100, 10, "chatbot")
    judged = judge_loops([done("a0", True), done("a1", False), done("a2", True), done("b0", True), done("b1", True),
                          done("d", False)], [late, on_time, unsent, single])
    assert {o.request_id: o.met for o in judged} == {"a0": True, "a1": False, "a2": False, "a3": False,
                                                       "b0": True, "b1": True, "d": False}
    a3 = next(o for o in judged if o.request_id == "a3")
    assert not a3.finished and a3.ttft_s is None


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"public traces not at {TRACES}")
def test_the_papers_objectives_where_it_gives_them() -> None:
    coding = scenario("coding", A100, 2.0, 10.0, seed=1, objectives="paper")[0]
    summary = scenario("summarization", A100, 2.0, 10.0, seed=1, objectives="paper")[0]
    assert coding.tpot_ms == 50.0 and summary.tpot_ms == 100.0
    assert summary.ttft_ms == pytest.approx(3e3 * idle_latency(A100, summary.prompt_tokens)[0])
    ours = scenario("summarization", A100, 2.0, 10.0, seed=1)[0]
    assert ours.request_id == summary.request_id and ours.tpot_ms != summary.tpot_ms
