"""Admission planning: small cases whose best admitted set is known by enumeration, and
properties over random workloads (hypothesis): what is admitted fits, promised requests are
never dropped, nothing is lost."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.admission import Job, Jobs, Plan, Replica, _plan, plan
from shared.roofline import ModelShape, Profile, RooflineParams

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))
IDLE = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10_000)
PREFILL = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10_000, prefill_only=True)


def feasible(jobs: list[Job], p: Plan, now: float, free_blocks: int) -> bool:
    """Deadline order: each request's prefill and everything before it fits the budgets of the
    batches that end by its deadline; the blocks fit."""
    used = 0
    for j in sorted(jobs, key=lambda j: j.deadline):
        used += j.prefill_tokens
        batches = math.inf if math.isinf(j.deadline) else max(0, math.floor((j.deadline - now) / p.step_s))
        if used > batches * p.budget:
            return False
    return sum(j.blocks for j in jobs) <= free_blocks


def best_count(jobs: list[Job], p: Plan, now: float, free_blocks: int) -> int:
    return max(n for n in range(len(jobs) + 1)
               for subset in itertools.combinations(jobs, n) if feasible(list(subset), p, now, free_blocks))


def test_tight_deadlines_keep_the_most_requests() -> None:
    """One big prompt due early crowds out two small ones: the planner drops the big one."""
    probe = plan(GPU, PREFILL, [Job("x", 1, 1, 1.0, 0.05)], 0.0)
    b, step = probe.budget, probe.step_s
    jobs = [Job("big", 2 * b, 1, 2 * step + 1e-6, 0.05),
            Job("small1", b // 2, 1, 2 * step + 1e-6, 0.05),
            Job("small2", b // 2, 1, 2 * step + 1e-6, 0.05)]
    p = plan(GPU, PREFILL, jobs, 0.0)
    assert set(p.admitted) == {"small1", "small2"} and p.rejected == ["big"]
    assert p.chunks == {"small1": b // 2, "small2": b // 2}


def test_a_prompt_counts_against_the_budgets_as_its_cost_not_its_tokens() -> None:
    """A long prompt's attention to itself takes budget too: a prompt whose tokens fit the
    batches before its deadline but whose cost does not is not promised."""
    probe = plan(GPU, PREFILL, [Job("x", 1, 1, 1.0, 0.05)], 0.0)
    b, step = probe.budget, probe.step_s
    due = 2 * step + 1e-6  # two batches
    assert plan(GPU, PREFILL, [Job("long", 2 * b, 1, due, 0.05)], 0.0).admitted == ["long"]
    p = plan(GPU, PREFILL, [Job("long", 2 * b, 1, due, 0.05, cost=2.1 * b)], 0.0)
    assert p.admitted == [] and p.rejected == ["long"]
    p = plan(GPU, PREFILL, [Job("long", 2 * b, 1, due, 0.05, promised=True, cost=2.1 * b)], 0.0)
    assert p.late == ["long"] and p.needed > b  # by its tokens alone the next batch would need b


def test_promised_requests_stay_even_when_late() -> None:
    probe = plan(GPU, IDLE, [Job("x", 1, 1, 1.0, 0.05)], 0.0)
    jobs = [Job("old", 10 * probe.budget, 1, probe.step_s, 0.05, promised=True),
            Job("new", 1, 1, probe.step_s, 0.05)]
    p = plan(GPU, IDLE, jobs, 0.0)
    assert "old" in p.admitted and p.late == ["old"] and p.rejected == ["new"]


def test_a_tight_tpot_shortens_batches_only_when_that_admits_more() -> None:
    """At a 0.2 s period five 2,900-token prompts fit by 1 s; at 0.012 s only four do, beside
    the tight request: a tie, which keeps the longer period."""
    loose = [Job(f"l{i}", 2900, 1, 1.0, 0.2) for i in range(5)]
    tight = Job("t", 100, 1, 1.0, 0.012)
    p = plan(GPU, IDLE, [*loose, tight], 0.0)
    assert p.step_s == 0.2 and p.rejected == ["t"]
    p = plan(GPU, IDLE, [loose[0], tight], 0.0)
    assert p.step_s == 0.012 and set(p.admitted) == {"l0", "t"}


def test_memory_limits_admission() -> None:
    replica = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10)
    jobs = [Job("a", 10, 6, math.inf, None), Job("b", 10, 5, math.inf, None), Job("c", 10, 4, math.inf, None)]
    p = plan(GPU, replica, jobs, 0.0)
    assert set(p.admitted) == {"b", "c"}


jobs_strategy = st.lists(
    st.tuples(st.integers(1, 6000), st.integers(1, 30), st.floats(0.0, 1.0), st.sampled_from([None, 0.05, 0.1]),
              st.booleans()),
    min_size=0, max_size=7)


@settings(max_examples=300, deadline=None)
@given(jobs_strategy, st.integers(1, 120), st.integers(0, 40), st.booleans())
def test_random_workloads(raw: list[tuple], free_blocks: int, decoding: int, prefill_only: bool) -> None:
    now = 10.0
    jobs = [Job(f"r{i}", tokens, blocks, now + slack if slack < 0.95 else math.inf, tpot, promised=promised and i == 0,
                context=tokens + 100) for i, (tokens, blocks, slack, tpot, promised) in enumerate(raw)]
    if prefill_only:
        replica = Replica(0, 0, None, free_blocks, prefill_only=True)
    else:
        replica = Replica(decoding, decoding * 500, 0.1 if decoding else None, free_blocks)
    p = plan(GPU, replica, jobs, now)
    ids = [j.request_id for j in jobs]
    assert sorted(p.admitted + p.rejected) == sorted(ids)  # nothing lost, nothing twice
    assert {j.request_id for j in jobs if j.promised} <= set(p.admitted)  # never dropped
    admitted = [j for j in jobs if j.request_id in p.admitted]
    on_time = [j for j in admitted if j.request_id not in p.late]
    if not p.late:
        assert feasible(on_time, p, now, free_blocks)
    assert prefill_only or all(j.tpot_s is None or j.tpot_s >= p.step_s or j.promised for j in admitted)
    assert p.budget <= p.next_budget and sum(p.chunks.values()) <= p.next_budget
    assert list(p.chunks) == p.admitted[:len(p.chunks)]  # earliest deadlines first
    roomy = free_blocks >= sum(j.blocks for j in jobs)
    if prefill_only and roomy and not any(j.promised for j in jobs):  # tokens alone: the rule is optimal
        assert len(p.admitted) == best_count(jobs, p, now, free_blocks)


def test_ten_thousand_requests_are_each_admitted_or_rejected() -> None:
    rng = np.random.default_rng(0)
    jobs = [Job(f"r{i}", int(rng.integers(10, 2000)), int(rng.integers(1, 20)), float(rng.uniform(0, 30)),
                float(rng.choice([0.05, 0.1, 0.2]))) for i in range(10_000)]
    replica = Replica(decoding=64, context_tokens=64 * 800, tightest_tpot_s=0.1, free_blocks=50_000)
    p = plan(GPU, replica, jobs, 0.0)
    assert len(p.admitted) + len(p.rejected) == 10_000 and 0 < len(p.admitted) < 10_000


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.sampled_from([None, 0.02, 0.1, 0.5]), st.floats(0.0, 1.0), st.integers(0, 4),
       st.booleans(), st.booleans())
def test_nothing_to_prefill_plans_the_period_as_the_whole_plan_would(
        decoding: int, tpot: float | None, alpha: float, max_spec_len: int, prefill_only: bool, busy: bool) -> None:
    """`plan` takes a short cut when no request has prompt left; it must come to what the
    whole dynamic program does on an empty queue."""
    replica = Replica(decoding, decoding * 700, tpot, 5_000, prefill_only=prefill_only, alpha=alpha,
                      max_spec_len=max_spec_len, busy=busy)
    short = plan(GPU, replica, [], 3.0)
    whole = _plan(GPU, replica, Jobs.of([]), 3.0)
    for got in (short, whole):
        got.rows = got.rows.tolist()
    assert short == whole
