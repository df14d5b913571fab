"""Admission and prefill planning for one replica, as a dynamic program: which waiting requests
can be promised their TTFT without breaking a promise already made or any running request's
TPOT, and how many prefill tokens the next batch gives each of them.

The model. Requests are taken in deadline order; a request decodes from its deadline on (its
first token is due then) and its KV blocks are held from admission. Between two consecutive
deadlines batches repeat with one period, set by the tightest TPOT among the requests decoding
in that interval, the running ones and the admitted ones due earlier: for each TPOT tier τ the
speculative length k is the one that leaves the most prefill tokens per second beside the
decode work (`planner.spec_choice.periods`), and the period is τ·G(k), G(k) the tokens a step
gains that a promise counts on (below their mean: acceptance is a draw), at the acceptance of
the class of the requests that bring the tier (the lowest, if several); running requests of
looser tiers verify only what their own TPOT needs at that period. What a batch's decode work
leaves is its prefill budget; joining requests are priced at the mean context of the
candidates and at the period's k. No period is longer than one batch that prefills every
waiting prompt beside every request that may be decoding (the running ones and all that may
join, at the period's k): the engine runs batches back to back, so with little waiting a batch
is that short, and a loose TPOT's whole period would see no short prompt done in time. A set
is feasible when, at each admitted request's deadline, the prefill cost
(`shared.roofline.prefill_cost`) of it and of every admitted request due before it fits the
budgets of the batches that end by then, its blocks fit, and every interval's decoders keep
their TPOT. Batches of the first period run from now (after what the step in flight has left,
as priced) and are counted whole. A later period starts at the last batch boundary before the
deadline that brings it, so from there it is counted as its share of the interval's seconds
less one batch: a lower bound of what runs.

The program. The state after each request is (requests admitted, tightest tier decoding, KV
memory held, whether a period started at the current deadline); its value, the slack
(capacity so far less prefill cost so far), is all that matters for what may still be
admitted, so keeping the largest per state finds the plan that admits the most, exactly
(`planner/_dp.c`). Memory counts blocks while at most `MEMORY_UNITS` are free; beyond, units
of the free blocks rounded to the nearest, and a plan the rounding lets over is cut back.
Requests already promised must be admitted; when no plan keeps all of them the plan keeps the
most it can (giving up the ones due last where that keeps as many), reports the rest as
`late`, and admits nothing new; a late one runs in deadline order where the slack of those
due after it allows, else last; one already past its deadline runs first where every other's
slack allows, else last. A call plans at most the `planner.jobs.CONSIDERED` earliest
deadlines beside the promised requests, fewer when the memory dimension would make the program
larger than `WORK_LIMIT` states; the rest wait for the next call, a batch later. The next batch's chunks
fill its budget as `prefill_cost` counts it, so a chunk deep into a long prompt gets fewer
tokens than one at its start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from planner import _dp
from planner.jobs import Job, Jobs, earliest
from planner.prices import DEFAULT_CONTEXT, Replica, Tables, batch_periods, price_tables
from shared.roofline import ModelShape, Profile, prefill_cost, prefill_within

WORK_LIMIT = 250_000  # requests × states the program may visit in one call
MEMORY_UNITS = 64  # the free KV blocks, when they bind, in at most this many units
TIER_WIDTH = 0.05  # TPOTs this close (relatively) share a tier
MAX_TIERS = 16  # tiers one program keeps apart at most


@dataclass
class Plan:
    admitted: list[str]  # in the order their prompts run (`_order`)
    admitted_tokens: list[int]  # their prefill tokens left
    rejected: list[str]  # do not fit now: park them or refuse
    step_s: float  # the next batch's period
    budget: int  # prefill tokens per batch, once the admitted requests decode too
    spec_len: int = 0  # speculative length of the tightest tier in the next batch
    next_budget: int = 0  # prefill tokens the next batch has room for: only what runs now decodes in it
    chunks: dict[str, int] = field(default_factory=dict)  # prefill tokens in the next batch, at most
    needed: int = 0  # prefill tokens the next batch must run for every admitted request to stay on time
    late: list[str] = field(default_factory=list)  # promised, but no plan keeps them on time
    crowded: bool = False  # KV blocks or batch slots, not time, turned a request away


def plan(profile: Profile, replica: Replica, jobs: Jobs | list[Job], now: float) -> Plan:
    if not len(jobs):
        return _period_plan(profile, replica)
    if isinstance(jobs, list):
        jobs = Jobs.of(jobs)
    late = jobs.promised & (jobs.deadline <= now)  # past their deadline already: whenever there is room
    jobs = replace(jobs, deadline=np.where(late, np.inf, jobs.deadline))
    keep = jobs.promised.copy()
    keep[~jobs.promised] = earliest(jobs.deadline[~jobs.promised])  # a burst: only the earliest compete now
    queue = jobs.take(np.flatnonzero(keep))
    queue = queue.take(np.lexsort((~queue.promised, queue.deadline)))  # deadline order, promised first among equals
    p = _plan(profile, replica, queue, now, frozenset(jobs.ids[late].tolist()))
    p.rejected += jobs.ids[~keep].tolist()
    if late.any():
        p.late = sorted(set(p.late) | set(jobs.ids[late].tolist()), key=p.admitted.index)
    if p.late:
        p.needed = p.next_budget  # late already: as much as fits
    return p


@dataclass(frozen=True)
class Program:
    """The dynamic program for one call, as the kernel takes it: requests in deadline order
    (their interval since the one before, cost, tier, memory units, whether promised) and the
    tables by (joining count, tier)."""

    queue: Jobs
    rows: np.ndarray  # where in the queue given to `program` each of its requests is
    count: int  # the most requests it may admit, promised ones included
    new_cap: int  # the most new ones
    tables: Tables
    memory: int  # memory units free; 0: memory does not bind
    whole: np.ndarray  # batches of the first period in each request's interval
    span: np.ndarray  # seconds of each request's interval
    tier: np.ndarray  # int32
    units: np.ndarray  # int32
    tied: np.ndarray  # uint8: due with the request before it
    rate: np.ndarray  # prefill budget per second, (count + 1) × tiers; -1: the decoders would miss their TPOT
    budget: np.ndarray  # prefill budget per batch, never below 0

    @property
    def t0(self) -> int:
        return len(self.tables.tiers) - 1

    def solve(self, cost: np.ndarray, forced: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """The most requests admitted (-1: none keeps every forced one), which, and the slack
        left at each admitted one's deadline."""
        n = len(self.queue)
        out, slack = np.zeros(n, dtype=np.uint8), np.empty(n)
        got = _dp.solve(n, self.count, len(self.tables.tiers), self.memory, self.t0, self.tables.first_below,
                        self.whole, self.span, np.ascontiguousarray(cost, dtype=np.float64), self.tier, self.units,
                        forced.astype(np.uint8), self.tied, self.rate, self.budget, self.tables.step, out, slack)
        return got, out.astype(bool), slack


def program(profile: Profile, replica: Replica, queue: Jobs, now: float) -> Program:
    """The program for `queue` (in deadline order, promised first among equals), cut short
    where it would be larger than `WORK_LIMIT`: the latest new requests are left out."""
    promised = int(queue.promised.sum())
    tiers, tier = _tiers(replica, queue)
    cap = replica.max_num_seqs - replica.decoding - promised
    if replica.max_new is not None:
        cap = min(cap, replica.max_new)
    units, memory = _units(queue.blocks, replica.free_blocks)
    n = len(queue)
    count = min(n, promised + max(0, cap))
    while n * (count + 1) * len(tiers) * (memory + 1) > WORK_LIMIT and n > promised + 16:
        n = max(promised + 16, n // 2)
        count = min(n, promised + max(0, cap))
    rows = np.arange(len(queue))
    if n < len(queue):  # every promised request and the earliest new ones
        rows = np.flatnonzero(queue.promised | (np.cumsum(~queue.promised) <= n - promised))
        queue, tier, units = queue.take(rows), tier[rows], units[rows]
    longest = float((queue.done + queue.tokens).max(initial=0))  # what a last chunk reads, at most
    tables = price_tables(profile, replica, tiers, count, float(queue.context.mean()) if n else DEFAULT_CONTEXT,
                          float(queue.cost.sum()), longest, _tier_alphas(replica, queue, tier, len(tiers)))
    step0 = float(tables.step[0, -1])
    whole, span = _intervals(queue.deadline, now, now + replica.busy_s, step0)
    budget = np.maximum(tables.budget, 0).astype(np.float64)
    rate = np.where(tables.budget >= 0, budget / tables.step, -1.0)
    rate[0] = np.maximum(rate[0], 0.0)  # what runs now runs, whatever it leaves
    tied = np.zeros(n, dtype=np.uint8)
    tied[1:] = queue.deadline[1:] == queue.deadline[:-1]
    return Program(queue, rows, count, cap, tables, memory, whole, span, tier.astype(np.int32), units.astype(np.int32),
                   tied, rate, budget)


def _plan(profile: Profile, replica: Replica, queue: Jobs, now: float, overdue: frozenset[str] = frozenset()) -> Plan:
    prog = program(profile, replica, queue, now)
    passed = np.ones(len(queue), dtype=bool)
    passed[prog.rows] = False
    passed_over = queue.ids[passed].tolist()
    queue, n, t0 = prog.queue, len(prog.queue), prog.t0
    got, taken, slack = prog.solve(queue.cost, queue.promised)
    late = np.zeros(n, dtype=bool)
    if got < 0:  # no plan keeps every promise: keep the most of them, admit nothing new
        got, taken, slack = prog.solve(np.where(queue.promised, queue.cost, np.inf), np.zeros(n, dtype=bool))
        kept = _kept_in_deadline_order(prog, queue.promised, int((queue.promised & ~taken).sum()))
        if kept is not None:
            got, taken, slack = kept
        late = queue.promised & ~taken
    if prog.memory:
        taken = _fit_memory(queue, taken, replica.free_blocks)
    rows = _order(taken, late, slack, queue.cost, np.isin(queue.ids, list(overdue)) if overdue else None)
    final = min(int(prog.tier[taken].min(initial=t0)), t0)
    budget0 = int(prog.budget[0, t0])
    needed = max(0, budget0 - int(slack[taken & np.isfinite(queue.deadline)].min(initial=budget0)))
    rejected = np.ones(n, dtype=bool)
    rejected[rows] = False
    p = Plan(
        admitted=queue.ids[rows].tolist(),
        admitted_tokens=queue.tokens[rows].tolist(),
        rejected=queue.ids[rejected].tolist() + passed_over,
        step_s=float(prog.tables.step[0, t0]),
        budget=int(prog.budget[min(len(rows), prog.count), final]),
        spec_len=int(prog.tables.spec_len[0, t0]),
        next_budget=budget0,
        needed=needed,
        late=queue.ids[late].tolist(),
        crowded=_crowded(replica, queue, taken, rejected, prog.new_cap),
    )
    p.chunks = _next_batch(profile.model, p.admitted, p.admitted_tokens, queue.done[rows].tolist(), p.next_budget)
    return p


def _kept_in_deadline_order(prog: Program, promised: np.ndarray,
                            missed: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The plan that gives up the `missed` promises due last, if it keeps all the others: as
    many kept as the most the program keeps, and the ones given up run next in deadline order,
    each late by the least, rather than the largest prompts waiting to the end."""
    keep = promised.copy()
    keep[np.flatnonzero(promised)[::-1][:missed]] = False
    got, taken, slack = prog.solve(np.where(keep, prog.queue.cost, np.inf), keep)
    return None if got < 0 else (got, taken, slack)


def _crowded(replica: Replica, queue: Jobs, taken: np.ndarray, rejected: np.ndarray, new_cap: int) -> bool:
    """Whether KV blocks or batch slots, not time, turned a request away: the count reached its
    cap, or a request turned away does not fit in the blocks the admitted ones leave."""
    if not rejected.any():
        return False
    if int((taken & ~queue.promised).sum()) >= new_cap:
        return True
    left = replica.free_blocks - int(queue.blocks[taken].sum())
    return bool((queue.blocks[rejected] > left).any())


def _tiers(replica: Replica, queue: Jobs) -> tuple[list[float | None], np.ndarray]:
    """The TPOT tiers a period may be set by, tightest first, and each request's: the tier it
    brings once it decodes (the last, what runs now, when it brings none tighter). TPOTs within
    `TIER_WIDTH` of each other share a tier at the tightest of them: a new period may cost a
    batch, which objectives a hair apart (a client's 100 ms and another's 101 ms) should not."""
    if replica.prefill_only:
        return [None], np.zeros(len(queue), dtype=np.int64)
    floor = replica.tightest_tpot_s or math.inf
    tighter = ~np.isnan(queue.tpot) & (queue.tpot < floor)
    if not tighter.any():  # most calls: nothing tighter than what runs
        return [floor if math.isfinite(floor) else None], np.zeros(len(queue), dtype=np.int64)
    values = np.unique(queue.tpot[tighter])[::-1].tolist()
    width = TIER_WIDTH
    while True:  # as many tiers as the kernel takes: wider ones when the requests ask for more
        tops, lows = [floor], [floor]  # each tier's loosest and tightest TPOT, loosest tier first
        for v in values:
            if v * (1 + width) >= tops[-1]:
                lows[-1] = v
            else:
                tops.append(v)
                lows.append(v)
        if len(tops) <= MAX_TIERS:
            break
        width *= 2
    tops.reverse()
    lows.reverse()
    tier = np.where(tighter, np.searchsorted(tops, np.where(tighter, queue.tpot, 0.0)), len(tops) - 1)
    return [low if math.isfinite(low) else None for low in lows], tier


def _tier_alphas(replica: Replica, queue: Jobs, tier: np.ndarray, count: int) -> list[float]:
    """The acceptance each tier's period is priced at: a tier a request brings, the lowest of
    its requests' classes (their TPOT is the one the period must keep, on their own draws);
    what runs now, the replica's."""
    alphas = np.full(count, np.inf)
    own = (tier < count - 1) & ~np.isnan(queue.alpha)
    np.minimum.at(alphas, tier[own], queue.alpha[own])
    alphas[~np.isfinite(alphas)] = replica.alpha
    return alphas.tolist()


def _units(blocks: np.ndarray, free: int) -> tuple[np.ndarray, int]:
    """Each request's KV blocks in memory units (to the nearest: `_fit_memory` repairs what the
    rounding lets through) and the units free; all zero when everything fits, so that memory
    adds nothing to the program. With no more free blocks than `MEMORY_UNITS` a unit is a block."""
    if int(blocks.sum()) <= free:
        return np.zeros(len(blocks), dtype=np.int64), 0
    unit = max(1, -(-free // MEMORY_UNITS))
    return np.rint(blocks / unit).astype(np.int64), free // unit


def _fit_memory(queue: Jobs, taken: np.ndarray, free: int) -> np.ndarray:
    """The admitted set less the new requests holding the most blocks, as many as it takes for
    the blocks (not their rounded units) to fit."""
    over = int(queue.blocks[taken].sum()) - free
    if over <= 0:
        return taken
    fresh = np.flatnonzero(taken & ~queue.promised)
    fresh = fresh[np.argsort(-queue.blocks[fresh], kind="stable")]
    drop = fresh[: int(np.searchsorted(np.cumsum(queue.blocks[fresh]), over)) + 1]
    taken = taken.copy()
    taken[drop] = False
    return taken


def _intervals(deadline: np.ndarray, now: float, start: float, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    """For each request in deadline order, the interval since the one before: whole batches of
    the first period (which starts at `start`) and seconds. The first deadline without a
    bound gets an infinite interval, those after it none."""
    finite = np.isfinite(deadline)
    ends = np.where(finite, deadline, now)
    batches = np.maximum(0.0, np.floor((ends - start) / step_s))
    whole = batches.copy()  # each interval's, not the running count (np.diff is slow on short arrays)
    whole[1:] -= batches[:-1]
    seconds = np.maximum(ends, start)
    span = seconds - start
    span[1:] = seconds[1:] - seconds[:-1]
    first_open = np.flatnonzero(~finite)[:1]
    whole[~finite], span[~finite] = 0.0, 0.0
    whole[first_open], span[first_open] = np.inf, np.inf
    return np.ascontiguousarray(whole), np.ascontiguousarray(span)


def _period_plan(profile: Profile, replica: Replica) -> Plan:
    """What `_plan` comes to with nothing to prefill: the batch period alone. Below capacity
    most calls are this one, so it skips the program."""
    floor = math.inf if replica.prefill_only else replica.tightest_tpot_s or math.inf
    tier = floor if math.isfinite(floor) else None
    none = np.zeros(1, dtype=np.int64)
    steps, budgets, ks = batch_periods(profile, replica, tier, none, none)
    budget = max(0, int(budgets[0]))
    return Plan([], [], [], float(steps[0]), budget, int(ks[0]), next_budget=budget)


def _order(taken: np.ndarray, late: np.ndarray, slack: np.ndarray, cost: np.ndarray,
           overdue: np.ndarray | None = None) -> np.ndarray:
    """The admitted rows in the order their prompts run: deadline order, except that a late
    one waits until the on-time ones are done unless every on-time one due after it has the
    slack to let it go first. The plan is priced with a margin, so a promise it finds late can
    often still be kept, and one served last is missed by far; but not at the price of another.
    A promise already past its deadline (`overdue`, planned as due whenever) goes before all
    where every other admitted one has the slack: else each request admitted after it would
    push it back again, and a prompt a step short of its deadline ends up missing it by seconds."""
    first: list[int] = []
    spent = 0.0  # slack the overdue ones that go first take from every other
    if overdue is not None:
        least = slack[taken & ~overdue].min(initial=np.inf)
        for i in np.flatnonzero(overdue & taken).tolist():
            if least - spent >= cost[i]:
                spent += cost[i]
                first.append(i)
        taken = taken.copy()
        taken[first] = False
    room = np.where(taken, slack - spent, np.inf)
    order, last = first, []
    for i in np.flatnonzero(taken | late).tolist():
        if taken[i]:
            order.append(i)
        elif room[i + 1:].min(initial=np.inf) >= cost[i]:
            room[i + 1:] -= cost[i]
            order.append(i)
        else:
            last.append(i)
    return np.array(order + last, dtype=np.int64)


def _next_batch(shape: ModelShape, admitted: list[str], tokens: list[int], done: list[int],
                budget: int) -> dict[str, int]:
    """The next batch's prefill: earliest deadline first, up to the budget as `prefill_cost`
    counts it (a chunk deep into a long prompt attends to more, so it gets fewer tokens)."""
    chunks: dict[str, int] = {}
    left = float(budget)
    for request_id, n, d in zip(admitted, tokens, done):
        t = min(n, prefill_within(shape, left, d))
        if t <= 0:
            break
        chunks[request_id] = t
        left -= float(prefill_cost(shape, t, d))
    return chunks
