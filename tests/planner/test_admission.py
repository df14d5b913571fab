"""The admission dynamic program against brute force over every subset, on the cases the
greedy planner before it got wrong and on 10,000 random small ones; and its plans executed
batch by batch, where every admitted request must meet its TTFT and TPOT."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.admission import Program, _plan, plan, program
from planner.jobs import Job, Jobs
from planner.prices import Replica
from shared.roofline import ModelShape, Profile, RooflineParams, prefill_within

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))
IDLE = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10_000)
PREFILL = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10_000, prefill_only=True)
TIERS = (0.02, 0.05, 0.1, 0.2)


def feasible(prog: Program, masks: np.ndarray) -> np.ndarray:
    """The model, written out again over many candidate sets at once (rows of `masks`): the
    slack at each admitted request's deadline never below zero, the decoders always on their
    TPOT, the memory and the count within bounds; a new period costs a batch once its
    deadline is passed."""
    k = len(masks)
    tables, t0 = prog.tables, prog.t0
    first_below = tables.first_below
    c, t = np.zeros(k, dtype=np.int64), np.full(k, t0)
    slack, held = np.zeros(k), np.zeros(k, dtype=np.int64)
    ok, pending = np.ones(k, dtype=bool), np.zeros(k, dtype=bool)
    for i in range(len(prog.queue)):
        if not prog.tied[i]:
            slack = slack - pending * prog.budget[c, t]
            pending[:] = False
        first = (c < first_below) & (t == t0)
        per = np.where(first, prog.budget[c, t], prog.rate[c, t])
        size = np.where(first, prog.whole[i], prog.span[i])
        with np.errstate(invalid="ignore"):
            slack = np.where(np.isinf(size), np.where(per > 0, np.inf, slack), slack + size * per)
        take = masks[:, i]
        c2, t2 = np.minimum(c + 1, prog.count), np.minimum(t, prog.tier[i])
        after = slack - prog.queue.cost[i]
        ok &= ~take | ((after >= 0) & (c + 1 <= prog.count) & (prog.rate[c2, t2] >= 0))
        fresh = (first & ~((c2 < first_below) & (t2 == t0))) | (~first & (tables.step[c2, t2] != tables.step[c, t]))
        pending |= take & fresh
        slack = np.where(take, after, slack)
        held += take * prog.units[i]
        c, t = np.where(take, c2, c), np.where(take, t2, t)
    return ok & (held <= prog.memory if prog.memory else True)


def brute_force(prog: Program, forced: np.ndarray) -> int:
    """The most requests any subset that holds every forced one admits (-1: none)."""
    n = len(prog.queue)
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    masks = masks[(masks | ~forced).all(axis=1)]
    ok = feasible(prog, masks)
    return int(masks[ok].sum(axis=1).max()) if ok.any() else -1


def queue_of(jobs: list[Job]) -> Jobs:
    q = Jobs.of(jobs)
    return q.take(np.lexsort((~q.promised, q.deadline)))


def check(replica: Replica, jobs: list[Job], now: float) -> int:
    """The program's optimum equals brute force's, its plan is feasible, and no promise breaks
    while the promised requests fit on their own. Returns how many it admits."""
    prog = program(GPU, replica, queue_of(jobs), now)
    assert len(prog.queue) == len(jobs)
    got, taken, slack = prog.solve(prog.queue.cost, prog.queue.promised)
    assert got == brute_force(prog, prog.queue.promised)
    if got >= 0:
        assert taken.sum() == got and feasible(prog, taken[None, :])[0]
        assert (slack[taken] >= -1e-6).all() and taken[prog.queue.promised].all()
    p = plan(GPU, replica, jobs, now)
    assert sorted(p.admitted + p.rejected) == sorted(j.request_id for j in jobs)
    promised = {j.request_id for j in jobs if j.promised}
    if got >= 0:  # the promised requests fit: none is late
        assert p.late == [] and len(p.admitted) == got
    else:  # they do not, with or without new ones: the most of them are kept, on time
        only = np.where(prog.queue.promised, prog.queue.cost, np.inf)
        most = brute_force(Program(**{**prog.__dict__, "queue": Jobs(*prog.queue._columns()[:-1], only)}), 0 * taken)
        assert set(p.admitted) == promised and len(promised) - len(p.late) == most
    return len(p.admitted)


def test_a_promise_is_never_broken_to_admit_a_tight_request() -> None:
    """The greedy planner switched to 15 ms batches for the new request and made a promised
    one late; the four promised ones fit at 200 ms."""
    replica = Replica(decoding=2, context_tokens=1000, tightest_tpot_s=0.2, free_blocks=10_000)
    promised = [Job(f"p{i}", n, 0, 1.0, 0.2, promised=True, context=3000)
                for i, n in enumerate((2605, 2800, 2800, 2800))]
    jobs = [*promised, Job("new", 100, 1, 1.25, 0.015, context=400)]
    check(replica, jobs, 0.2)
    p = plan(GPU, replica, jobs, 0.2)
    assert p.late == [] and {"p0", "p1", "p2", "p3"} <= set(p.admitted)


def test_a_tier_is_priced_at_the_acceptance_of_the_requests_that_bring_it() -> None:
    """Sixteen requests decode at 100 ms, of a class whose proposals are mostly accepted; a new
    one asks for 10 ms, which only speculation keeps here. At the running class's acceptance the
    10 ms tier looks feasible; at the new request's own (its class's proposals rarely pass) it is
    not, and the request is not admitted."""
    replica = Replica(decoding=16, context_tokens=16_000, tightest_tpot_s=0.1, free_blocks=10_000, alpha=0.9,
                      max_spec_len=8, decode_tpots=(0.1,) * 16)
    assert plan(GPU, replica, [Job("c", 200, 1, 1.0, 0.01, context=500)], 0.0).admitted == ["c"]
    assert plan(GPU, replica, [Job("c", 200, 1, 1.0, 0.01, context=500, alpha=0.9)], 0.0).admitted == ["c"]
    assert plan(GPU, replica, [Job("c", 200, 1, 1.0, 0.01, context=500, alpha=0.1)], 0.0).admitted == []


def test_tokens_and_blocks_both_bind() -> None:
    """Two batches of 726 tokens, 10 free blocks: {A, B, D} fits, which the greedy missed ({C, D})."""
    probe = plan(GPU, PREFILL, [Job("x", 1, 1, 1.0, None)], 0.0)
    u, due = probe.next_budget // 5, 2 * probe.step_s + 1e-6
    replica = Replica(0, 0, None, free_blocks=10, prefill_only=True)
    jobs = [Job("A", 5 * u, 1, due, None), Job("B", 4 * u, 6, due, None), Job("C", 4 * u, 6, due, None),
            Job("D", u, 1, due, None)]
    assert check(replica, jobs, 0.0) == 3
    assert set(plan(GPU, replica, jobs, 0.0).admitted) == {"A", "B", "D"}


def test_decode_work_does_not_collapse_the_plan() -> None:
    """Eight decoding at 100 ms; A is due before a batch can end, B, C and D all fit."""
    replica = Replica(decoding=8, context_tokens=8 * 1000, tightest_tpot_s=0.1, free_blocks=10_000)
    jobs = [Job("A", 828, 1, 0.075, 0.03, context=8000)] + [Job(x, 1000, 1, 1.0, 0.03, context=1200) for x in "BCD"]
    assert check(replica, jobs, 0.0) == 3
    assert set(plan(GPU, replica, jobs, 0.0).admitted) == {"B", "C", "D"}


def test_a_tpot_counts_only_once_its_request_decodes() -> None:
    """On an idle replica a prompt due in 91 ms is admitted whether it has a 100 ms TPOT or
    none: it decodes after its deadline. Five loose requests due at 1 s and a tight one due
    at 1.21 s all fit: the tight period starts when the tight request decodes."""
    for tpot in (0.1, None):
        assert plan(GPU, IDLE, [Job("r", 484, 1, 0.091, tpot)], 0.0).admitted == ["r"]
    jobs = [Job(f"l{i}", 2900, 1, 1.0, 0.2) for i in range(5)] + [Job("t", 100, 1, 1.21, 0.012)]
    assert check(IDLE, jobs, 0.0) == 6


def test_a_promise_that_cannot_be_kept_is_reported_and_the_most_are_kept() -> None:
    probe = plan(GPU, IDLE, [Job("x", 1, 1, 1.0, None)], 0.0)
    due = 2 * probe.step_s + 1e-6
    jobs = [Job("big", 2 * probe.next_budget, 0, due, None, promised=True),
            Job("s1", probe.next_budget // 2, 0, due, None, promised=True),
            Job("s2", probe.next_budget // 2, 0, due, None, promised=True), Job("new", 1, 1, 5.0, None)]
    p = plan(GPU, IDLE, jobs, 0.0)
    assert p.admitted == ["s1", "s2", "big"] and p.late == ["big"] and p.rejected == ["new"]
    assert p.needed == p.next_budget


def test_where_as_many_promises_are_kept_either_way_the_ones_due_last_are_the_late_ones() -> None:
    """Seen in the simulator: two promises, the first due in three batches with 2.5 batches of
    prompt, the second a batch later with 1.6 (off by a few tokens after batches ran short of
    the plan). Keeping the most keeps either; the smaller one kept, the first ran last and
    missed by seconds. Giving up the one due last, it runs next, late by a fraction of a batch."""
    probe = plan(GPU, IDLE, [Job("x", 1, 1, 1.0, None)], 0.0)
    b, step = probe.next_budget, probe.step_s
    jobs = [Job("first", 5 * b // 2, 0, 3 * step + 1e-6, None, promised=True),
            Job("second", 8 * b // 5, 0, 4 * step + 1e-6, None, promised=True)]
    p = plan(GPU, IDLE, jobs, 0.0)
    assert p.late == ["second"] and p.admitted == ["first", "second"]


def test_a_late_promise_goes_first_only_where_the_others_have_the_slack() -> None:
    """A promise the plan finds late runs in deadline order when every on-time one due after it
    could still finish after it (the plan is priced with a margin: it may well make it), and
    last when running it first would make another late too."""
    probe = plan(GPU, IDLE, [Job("x", 1, 1, 1.0, None)], 0.0)
    due = 2 * probe.step_s + 1e-6
    lots = [Job("late", 3 * probe.next_budget, 0, due, None, promised=True),
            Job("later", probe.next_budget, 0, 40 * probe.step_s, None, promised=True)]
    p = plan(GPU, IDLE, lots, 0.0)
    assert p.late == ["late"] and p.admitted == ["late", "later"]
    assert p.chunks == {"late": prefill_within(GPU.model, p.next_budget, 0)}
    tight = [lots[0], Job("later", probe.next_budget, 0, 3 * probe.step_s + 1e-6, None, promised=True)]
    p = plan(GPU, IDLE, tight, 0.0)
    assert p.late == ["late"] and p.admitted == ["later", "late"]


def test_a_promise_past_its_deadline_goes_before_new_requests_that_have_the_slack() -> None:
    """Seen live: a promised prompt one step short of its deadline, once past it, was planned
    last, and every request admitted after it went first, so it missed its TTFT by seconds.
    It now goes first where every other admitted request can still finish on time after it."""
    probe = plan(GPU, IDLE, [Job("x", 1, 1, 1.0, None)], 0.0)
    overdue = Job("overdue", probe.next_budget // 2, 0, -0.01, None, promised=True)
    loose = [Job(f"new{i}", probe.next_budget, 1, 40 * probe.step_s, None) for i in range(3)]
    p = plan(GPU, IDLE, [overdue, *loose], 0.0)
    assert p.admitted[0] == "overdue" and p.chunks["overdue"] == overdue.prefill_tokens and len(p.admitted) == 4
    tight = [Job("new", probe.next_budget, 1, probe.step_s + 1e-6, None)]  # no slack for it to go first
    p = plan(GPU, IDLE, [overdue, *tight], 0.0)
    assert p.admitted == ["new", "overdue"]


def test_a_long_queue_is_cut_to_its_earliest_new_requests_never_its_promises() -> None:
    """Where the program would grow past its work limit it plans the earliest new requests;
    promised ones without a deadline (sorted last) stay in the plan."""
    replica = Replica(decoding=4, context_tokens=4000, tightest_tpot_s=0.1, free_blocks=3000)
    jobs = [Job(f"n{i}", 200, 40, 5.0 + i * 0.01, 0.1) for i in range(300)]
    jobs += [Job(f"p{i}", 100, 0, math.inf, None, promised=True) for i in range(3)]
    assert len(program(GPU, replica, queue_of(jobs), 0.0).queue) < len(jobs)
    p = plan(GPU, replica, jobs, 0.0)
    assert {"p0", "p1", "p2"} <= set(p.admitted) and p.late == []
    assert sorted(p.admitted + p.rejected) == sorted(j.request_id for j in jobs)
    assert sum(40 for rid in p.admitted if rid.startswith("n")) <= 3000


def test_many_distinct_tpots_share_few_tiers() -> None:
    """Clients may ask for any TPOT: 300 distinct ones still make a program the kernel takes,
    and each request's tier is at least as tight as its own TPOT."""
    jobs = [Job(f"r{i}", 50, 1, 10.0 + i, 0.01 * 1.03**i) for i in range(300)]
    prog = program(GPU, IDLE, queue_of(jobs), 0.0)
    assert len(prog.tables.tiers) <= 16
    tiers = np.array([t if t is not None else np.inf for t in prog.tables.tiers])
    assert (tiers[prog.tier] <= prog.queue.tpot + 1e-12).all()
    assert len(plan(GPU, IDLE, jobs, 0.0).admitted) > 0


def test_memory_limits_admission() -> None:
    replica = Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=10)
    jobs = [Job("a", 10, 6, math.inf, None), Job("b", 10, 5, math.inf, None), Job("c", 10, 4, math.inf, None)]
    assert set(plan(GPU, replica, jobs, 0.0).admitted) == {"b", "c"}


def random_instance(rng: np.random.Generator) -> tuple[Replica, list[Job], float]:
    """2-10 requests on a replica where prefill tokens and KV blocks both bind, with 1-4 TPOT
    tiers, promised and new requests, and requests decoding."""
    tiers = rng.choice(TIERS, size=int(rng.integers(1, 5)), replace=False)
    decoding = int(rng.choice([0, 0, 2, 8, 24]))
    running = float(rng.choice(tiers)) if decoding and rng.random() < 0.8 else None
    free = int(rng.integers(4, 40))
    replica = Replica(decoding, decoding * int(rng.integers(200, 3000)), running, free,
                      max_num_seqs=int(rng.choice([256, decoding + 5])), prefill_only=bool(rng.random() < 0.15),
                      busy_s=float(rng.uniform(0.0, 0.3)) if rng.random() < 0.3 else 0.0)
    now = 5.0
    jobs = []
    for i in range(int(rng.integers(2, 11))):
        promised = bool(rng.random() < 0.25)
        due = now + float(rng.uniform(0.0, 1.5)) if rng.random() < 0.95 else math.inf
        tpot = None if rng.random() < 0.15 else float(rng.choice(tiers))
        tokens = int(rng.integers(20, 4000))
        jobs.append(Job(f"r{i}", tokens, 0 if promised else int(rng.integers(1, 9)), due, tpot, promised,
                        context=tokens + int(rng.integers(0, 2000)), cost=tokens * float(rng.uniform(1.0, 1.3))))
    return replica, jobs, now


@pytest.mark.parametrize("seed", range(4))
def test_ten_thousand_random_instances_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(2500):
        check(*random_instance(rng), )


def execute(prog: Program, taken: np.ndarray, now: float, busy_s: float) -> None:
    """Run the plan batch by batch: each batch's decoders are the admitted requests due before
    it ends, its period and budget are the model's for them, and its prefill goes earliest
    deadline first. Every admitted request's prefill must end by its deadline and before it
    first decodes, and its n-th token must come by its deadline plus n TPOTs."""
    q = prog.queue
    rows = np.flatnonzero(taken & np.isfinite(q.deadline))
    left = {int(i): float(q.cost[i]) for i in rows}
    done_at: dict[int, float] = {}
    tokens = {int(i): 0 for i in rows}
    t0 = prog.t0
    clock = now + busy_s
    horizon = float(q.deadline[rows].max(initial=now)) + 1.0
    while clock < horizon:
        members = {int(i) for i in rows if q.deadline[i] <= clock}
        for i in rows:  # in deadline order, each joins the batch that would end after its deadline
            c, t = len(members), min([t0, *(int(prog.tier[j]) for j in members)])
            step = float(prog.tables.step[min(c, prog.count), t])
            if int(i) in members or q.deadline[i] >= clock + step - 1e-9:
                continue
            members.add(int(i))
        c, t = len(members), min([t0, *(int(prog.tier[j]) for j in members)])
        step = float(prog.tables.step[min(c, prog.count), t])
        assert prog.tables.budget[c, t] >= 0  # the decoders keep their TPOT
        end = clock + step
        for i in members:
            assert i in done_at and done_at[i] <= clock + 1e-9  # prefilled before it decodes
            tokens[i] += 1
            tpot = q.tpot[i]
            if not math.isnan(tpot):
                assert end <= q.deadline[i] + tokens[i] * tpot + 1e-9
        room = float(prog.tables.budget[c, t])
        for i in sorted(left, key=lambda i: q.deadline[i]):
            run = min(room, left[i])
            left[i] -= run
            room -= run
            if left[i] <= 1e-9:
                del left[i]
                done_at[i] = end
            if room <= 0:
                break
        clock = end
    for i in rows:
        assert done_at[int(i)] <= q.deadline[i] + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(50, 5000), st.floats(0.05, 2.0), st.sampled_from([None, *TIERS]),
                          st.booleans()), min_size=1, max_size=12),
       st.sampled_from([0, 4, 16]), st.sampled_from([None, *TIERS]), st.sampled_from([0.0, 0.003, 0.1]))
def test_admitted_requests_meet_their_slos_batch_by_batch(raw: list[tuple], decoding: int, running: float | None,
                                                           busy_s: float) -> None:
    now = 1.0
    replica = Replica(decoding, decoding * 800, running if decoding else None, 10_000, busy_s=busy_s)
    jobs = [Job(f"r{i}", n, 1, now + due, tpot, promised, context=n + 200)
            for i, (n, due, tpot, promised) in enumerate(raw)]
    prog = program(GPU, replica, queue_of(jobs), now)
    got, taken, _ = prog.solve(prog.queue.cost, prog.queue.promised)
    if got < 0:
        got, taken, _ = prog.solve(np.where(prog.queue.promised, prog.queue.cost, np.inf), np.zeros(len(jobs), bool))
    execute(prog, taken, now, busy_s)


def test_ten_thousand_requests_are_each_admitted_or_rejected() -> None:
    rng = np.random.default_rng(0)
    jobs = [Job(f"r{i}", int(rng.integers(10, 2000)), int(rng.integers(1, 20)), float(rng.uniform(0, 30)),
                float(rng.choice([0.05, 0.1, 0.2]))) for i in range(10_000)]
    replica = Replica(decoding=64, context_tokens=64 * 800, tightest_tpot_s=0.1, free_blocks=50_000)
    p = plan(GPU, replica, jobs, 0.0)
    assert len(p.admitted) + len(p.rejected) == 10_000 and 0 < len(p.admitted) < 10_000


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.sampled_from([None, 0.02, 0.1, 0.5]), st.floats(0.0, 1.0), st.integers(0, 4),
       st.booleans(), st.sampled_from([0.0, 0.05]))
def test_nothing_to_prefill_plans_the_period_as_the_whole_program_would(
        decoding: int, tpot: float | None, alpha: float, max_spec_len: int, prefill_only: bool, busy_s: float) -> None:
    """`plan` takes a short cut when no request has prompt left; it must come to what the
    whole program does on an empty queue."""
    replica = Replica(decoding, decoding * 700, tpot, 5_000, prefill_only=prefill_only, alpha=alpha,
                      max_spec_len=max_spec_len, busy_s=busy_s)
    assert plan(GPU, replica, [], 3.0) == _plan(GPU, replica, Jobs.of([]), 3.0)


