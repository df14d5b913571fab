"""Admission and prefill planning for one replica: which waiting requests can be promised
their TTFT without breaking any running request's TPOT, and how many prefill tokens each
upcoming batch gives each of them.

Batches repeat every `step_s`. On a replica that decodes, a batch must end before any
decoding request is late for its next token, so the period is the tightest TPOT among them,
stretched by the tokens speculation yields per step: with acceptance α and k proposed tokens
a sequence gains E(k) tokens a step, so the step may last τ·E(k). For each TPOT tier τ the
speculative length k is chosen by enumeration (`planner.spec_choice`) to leave the most
prefill tokens per second beside the decode work; those tokens are the per-batch budget.

A set of requests is feasible when, taken in deadline order, the prefill tokens of each
request and of all those before it fit in the budgets of the batches that end before its
deadline, and their KV blocks fit in memory. A prompt's tokens count as the budget prices
them, with their attention to the prompt before them (`shared.roofline.prefill_cost`). Among
feasible sets the planner keeps the largest: in deadline order it adds each request and, when
the set stops being feasible, drops the one whose removal frees the most of what ran out
(prefill tokens, or blocks). With tokens alone this is Moore and Hodgson's rule, which admits
the most requests possible. Requests already promised are never dropped. Each TPOT tier is
tried as the batch period (a tighter one admits tight requests but shrinks every budget) and
the tier admitting the most wins; then the budget is priced again with the decode work of
what it admits, which may only shrink it, and the plan redone at that budget, so the promise
holds once they decode too.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from planner.spec_choice import periods
from shared.roofline import Batches, Profile, prefill_budgets

IDLE_STEP_S = 0.05  # batch period with no TPOT to pace it
CONSIDERED = 256  # waiting requests, earliest deadlines first, that one call plans at most
DEFAULT_CONTEXT = 512  # context assumed for a decoding request when nothing else says
NO_DEADLINE_BATCHES = np.iinfo(np.int64).max // 4  # batches before a request without a deadline is due


@dataclass(frozen=True)
class Job:
    """A request that still has prompt to prefill."""

    request_id: str
    prefill_tokens: int
    blocks: int  # KV blocks it will hold at most
    deadline: float  # absolute TTFT deadline; inf when it has none
    tpot_s: float | None  # its decode objective; None when it has none
    promised: bool = False  # admitted earlier: never dropped
    context: int = 0  # KV tokens each of its decode steps reads, on average over its life
    cost: float | None = None  # budget tokens its prefill takes (`prefill_cost`); None: its tokens


@dataclass(frozen=True)
class Replica:
    """What is running on one replica (the decode work every batch carries) and what it may
    take on."""

    decoding: int  # requests decoding
    context_tokens: int  # their KV tokens, read by every decode step
    tightest_tpot_s: float | None
    free_blocks: int  # not held by running requests
    max_num_seqs: int = 256
    prefill_only: bool = False  # a prefill worker: no decode work in its batches
    max_new: int | None = None  # most requests it may admit now; None: no cap
    alpha: float = 0.0  # per-token speculative acceptance of its decoding requests
    max_spec_len: int = 0  # 0: it cannot speculate
    draft: Profile | None = None  # the draft model's cost, for a draft-model speculator
    busy: bool = False  # a step is running: the first planned batch starts after it


@dataclass(frozen=True)
class Period:
    step_s: float
    budget: int  # prefill tokens per batch
    spec_len: int  # tokens each tight request proposes per step


@dataclass
class Plan:
    admitted: list[str]  # in deadline order
    admitted_tokens: list[int]  # their prefill tokens left
    rejected: list[str]  # do not fit now: park them or refuse
    step_s: float  # batch period
    budget: int  # prefill tokens per batch, once the admitted requests decode too
    spec_len: int = 0  # speculative length of the tightest tier
    next_budget: int = 0  # prefill tokens the next batch has room for: only what runs now decodes in it
    chunks: dict[str, int] = field(default_factory=dict)  # prefill tokens in the next batch, at most
    needed: int = 0  # prefill tokens the next batch must run for every admitted request to stay on time
    late: list[str] = field(default_factory=list)  # promised, but now past what fits
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the admitted, in the planned jobs
    crowded: bool = False  # KV blocks or batch slots, not time, turned a request away


@dataclass(frozen=True)
class Jobs:
    """Requests with prompt left to prefill, as columns (see `Job`)."""

    ids: np.ndarray  # object
    tokens: np.ndarray
    blocks: np.ndarray
    deadline: np.ndarray
    tpot: np.ndarray  # nan for none
    promised: np.ndarray
    context: np.ndarray
    cost: np.ndarray  # budget tokens each prefill takes (float)

    @classmethod
    def of(cls, jobs: list[Job]) -> Jobs:
        n = len(jobs)
        return cls(np.array([j.request_id for j in jobs], dtype=object).reshape(n),
                   np.fromiter((j.prefill_tokens for j in jobs), np.int64, n),
                   np.fromiter((j.blocks for j in jobs), np.int64, n),
                   np.fromiter((j.deadline for j in jobs), np.float64, n),
                   np.fromiter((math.nan if j.tpot_s is None else j.tpot_s for j in jobs), np.float64, n),
                   np.fromiter((j.promised for j in jobs), bool, n),
                   np.fromiter((j.context for j in jobs), np.int64, n),
                   np.fromiter((j.prefill_tokens if j.cost is None else j.cost for j in jobs), np.float64, n))

    def __add__(self, other: Jobs) -> Jobs:
        return Jobs(*(np.concatenate([a, b]) for a, b in zip(self._columns(), other._columns())))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> Jobs:
        return Jobs(*(c[rows] for c in self._columns()))

    def _columns(self) -> tuple[np.ndarray, ...]:
        return self.ids, self.tokens, self.blocks, self.deadline, self.tpot, self.promised, self.context, self.cost


def plan(profile: Profile, replica: Replica, jobs: Jobs | list[Job], now: float) -> Plan:
    if not len(jobs):
        return _period_plan(profile, replica)
    if isinstance(jobs, list):
        jobs = Jobs.of(jobs)
    queue = jobs.take(np.lexsort((~jobs.promised, jobs.deadline)))  # deadline order, promised first among equals
    beyond = np.flatnonzero(~queue.promised)[CONSIDERED:]
    if len(beyond):  # a burst: only the earliest deadlines compete this time
        keep = np.ones(len(queue), dtype=bool)
        keep[beyond] = False
        queue, passed_over = queue.take(np.flatnonzero(keep)), queue.ids[beyond].tolist()
    else:
        passed_over = []
    best = _plan(profile, replica, queue, now)
    best.rejected += passed_over
    return best


def _plan(profile: Profile, replica: Replica, queue: Jobs, now: float) -> Plan:
    promised = int(queue.promised.sum())
    promised_context = int(queue.context[queue.promised].sum())
    tiers: list[float | None] = [None]
    if not replica.prefill_only:
        has_tpot = ~np.isnan(queue.tpot)
        floor = min(replica.tightest_tpot_s or math.inf,
                    float(queue.tpot[has_tpot & queue.promised].min(initial=math.inf)))
        found = set(queue.tpot[has_tpot].tolist())
        tiers = sorted(t for t in found | {floor} if t <= floor and math.isfinite(t)) or [None]
    best: Plan | None = None
    best_tier: float | None = None
    now_budget = 0  # the next batch decodes only what runs now: its budget
    for tier in reversed(tiers):  # on a tie the longer period wins: bigger budgets, more slack
        eligible = _eligible(queue, tier)
        if best is not None and int(eligible.sum()) <= len(best.admitted):
            continue  # cannot admit more than the best so far
        steps, budgets, ks = _periods(profile, replica, tier, np.array([promised, 0]), np.array([promised_context, 0]))
        candidate = _plan_at(queue, eligible, Period(float(steps[0]), int(budgets[0]), int(ks[0])), replica, now)
        if best is None or len(candidate.admitted) > len(best.admitted):
            best, best_tier, now_budget = candidate, tier, int(budgets[1])
    assert best is not None
    if len(best.admitted) > promised and not replica.prefill_only:
        best = _with_their_decode_work(profile, replica, queue, best, best_tier, now)
    best.next_budget = max(now_budget, best.budget)
    best.chunks = _next_batch(best.admitted, best.admitted_tokens, best.next_budget)
    return best


def _period_plan(profile: Profile, replica: Replica) -> Plan:
    """What `_plan` comes to with nothing to prefill: the batch period alone. Below capacity
    most calls are this one, so it skips the queue's arithmetic."""
    floor = math.inf if replica.prefill_only else replica.tightest_tpot_s or math.inf
    tier = floor if math.isfinite(floor) else None
    steps, budgets, ks = _periods(profile, replica, tier, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    return Plan([], [], [], float(steps[0]), int(budgets[0]), int(ks[0]), next_budget=int(budgets[0]))


def _eligible(queue: Jobs, tier: float | None) -> np.ndarray:
    """Requests a batch period of `tier` can serve: those with no TPOT, a looser one, or promised."""
    if tier is None:
        return np.ones(len(queue.ids), dtype=bool)
    return queue.promised | np.isnan(queue.tpot) | (queue.tpot >= tier)


def _with_their_decode_work(profile: Profile, replica: Replica, queue: Jobs, first: Plan,
                            tier: float | None, now: float) -> Plan:
    """The most new requests n such that the promised ones and the n new ones with the
    earliest deadlines, among those the plan priced without their decode work admitted (it
    admits the most it ever can), still meet their deadlines once the budget is priced with
    the decode work of all of them. Every n is priced at once; more joining requests only
    shrink the budget, so the largest n that fits is found by bisection."""
    sub = queue.take(first.rows)
    fresh = ~sub.promised
    rank = np.cumsum(fresh)  # new ones up to and including each row
    counts = np.arange(int(rank[-1]) + 1)
    joining_context = int(sub.context[sub.promised].sum()) + np.concatenate([[0], np.cumsum(sub.context[fresh])])
    steps, budgets, ks = _periods(profile, replica, tier, int(sub.promised.sum()) + counts, joining_context)

    def taken(n: int) -> np.ndarray:
        return sub.promised | (fresh & (rank <= n))

    def over(n: int) -> np.ndarray:
        rows = taken(n)
        batches = _batches(sub.deadline, now, float(steps[n]), replica.busy).astype(np.float64)
        return rows & (np.cumsum(np.where(rows, sub.cost, 0)) > batches * budgets[n])

    on_time = fresh | ~over(0)  # promised ones already late stay late whatever joins
    lo, hi = 0, len(counts) - 1
    if not (over(hi) & on_time).any():
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (over(mid) & on_time).any():
            hi = mid
        else:
            lo = mid
    rows = np.flatnonzero(taken(lo))
    plan = _plan_of(sub, rows, Period(float(steps[lo]), int(budgets[lo]), int(ks[lo])), replica, now,
                    np.zeros(len(sub), dtype=bool))
    rejected = np.ones(len(queue), dtype=bool)
    rejected[first.rows[rows]] = False
    plan.rejected = queue.ids[rejected].tolist()
    plan.late = [rid for rid in first.late if rid in set(plan.admitted)]
    plan.rows = first.rows[rows]
    plan.crowded = first.crowded
    return plan


def max_decode_batch(profile: Profile, context: float, tpot_s: float | None, max_num_seqs: int) -> int:
    """The most sequences of `context` tokens a plain decode step can hold and still last at
    most `tpot_s`."""
    if tpot_s is None:
        return max_num_seqs
    seqs = np.arange(1, max_num_seqs + 1)
    times = profile.predict(Batches.of(decode_seqs=seqs, kv_read=seqs * context, attention_pairs=seqs * context))
    return int((times <= tpot_s).sum())


def _periods(profile: Profile, replica: Replica, tpot_s: float | None, joining: np.ndarray,
             joining_context: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch period, prefill budget and speculative length at TPOT `tpot_s` (None: nothing
    paces the batches), with the running requests and each number in `joining` more (reading
    `joining_context` KV tokens a step) decoding."""
    if replica.prefill_only:
        joining, joining_context = 0 * joining, 0 * joining_context
    seqs = replica.decoding + joining
    kv_read = replica.context_tokens + joining_context
    if replica.prefill_only or tpot_s is None:
        step_s = IDLE_STEP_S if tpot_s is None else tpot_s
        budgets = prefill_budgets(profile.model, profile.params, step_s, seqs, 1.0, kv_read)
        return np.full(len(seqs), step_s), budgets, np.zeros(len(seqs), dtype=np.int64)
    ks, steps, budgets = periods(profile, tpot_s, seqs, np.rint(kv_read / np.maximum(1, seqs)), replica.alpha,
                                 replica.draft, replica.max_spec_len)
    return steps, np.maximum(budgets, 0), ks * (budgets >= 0)


def _plan_at(queue: Jobs, eligible: np.ndarray, period: Period, replica: Replica, now: float,
             limit: int | None = None) -> Plan:
    """The largest feasible set at this period and budget, with at most `limit` new requests."""
    rows = np.flatnonzero(eligible)
    promised = queue.promised[rows]
    batches = _batches(queue.deadline[rows], now, period.step_s, replica.busy)
    on_time, late = _by_deadline(queue.cost[rows], promised, batches, period.budget)
    keep, late_mem = _by_memory(on_time, queue.blocks[rows], promised, replica.free_blocks)
    cap = replica.max_num_seqs - replica.decoding - int(promised.sum())
    for bound in (replica.max_new, limit):
        if bound is not None:
            cap = min(cap, bound)
    extra = np.flatnonzero(keep & ~promised)[max(0, cap):]  # latest deadlines beyond the cap
    keep[extra] = False
    plan = _plan_of(queue, rows[keep], period, replica, now, ~eligible)
    plan.late = queue.ids[rows[late | late_mem]].tolist()
    plan.crowded = bool((on_time & ~keep).any())
    return plan


def _plan_of(queue: Jobs, kept: np.ndarray, period: Period, replica: Replica, now: float,
             ineligible: np.ndarray) -> Plan:
    """The plan that admits the rows `kept` (in deadline order) at this period."""
    rejected = np.ones(len(queue), dtype=bool)
    rejected[kept] = False
    batches = _batches(queue.deadline[kept], now, period.step_s, replica.busy)
    behind = np.cumsum(queue.cost[kept]) - np.maximum(batches - 1, 0).astype(np.float64) * period.budget
    return Plan(
        admitted=queue.ids[kept].tolist(),
        admitted_tokens=queue.tokens[kept].tolist(),
        rejected=queue.ids[rejected | ineligible].tolist(),
        step_s=period.step_s,
        budget=period.budget,
        spec_len=period.spec_len,
        needed=int(max(0.0, behind.max(initial=0.0))),
        rows=kept,
    )


def _batches(deadlines: np.ndarray, now: float, step_s: float, busy: bool) -> np.ndarray:
    """Batches that end by each deadline (a large number for none); one fewer while a step
    is still running."""
    finite = np.isfinite(deadlines)
    out = np.full(len(deadlines), NO_DEADLINE_BATCHES, dtype=np.int64)
    out[finite] = np.maximum(0, np.floor((deadlines[finite] - now) / step_s).astype(np.int64) - int(busy))
    return out


def _by_deadline(tokens: np.ndarray, promised: np.ndarray, batches: np.ndarray,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Moore and Hodgson's rule: in deadline order add each request, and while the tokens (as
    the budget counts them) no longer fit its capacity drop the largest droppable prompt kept
    so far. Returns the kept mask and the promised requests that do not fit even so."""
    n = len(tokens)
    keep = np.ones(n, dtype=bool)
    capacity = batches.astype(np.float64) * budget
    fits = np.cumsum(tokens) <= capacity
    if fits.all():
        return keep, np.zeros(n, dtype=bool)  # the common case: everyone fits
    first = int(np.argmin(fits))  # everything before the first overflow is kept as it is
    heap = [(-t, i) for i, t in enumerate(tokens[:first].tolist()) if not promised[i]]
    heapq.heapify(heap)
    used = float(tokens[:first].sum())
    token_list, promised_list, capacity_list = tokens.tolist(), promised.tolist(), capacity.tolist()
    push, pop = heapq.heappush, heapq.heappop
    for i in range(first, n):
        t = token_list[i]
        used += t
        if used <= capacity_list[i]:
            if not promised_list[i]:
                push(heap, (-t, i))
            continue
        if not promised_list[i]:
            if not heap or t >= -heap[0][0]:  # the largest so far: it is the one to drop
                keep[i] = False
                used -= t
                continue
            push(heap, (-t, i))
        while used > capacity_list[i] and heap:
            size, drop = pop(heap)
            keep[drop] = False
            used += size
    late = keep & promised & (np.cumsum(tokens * keep) > capacity)
    return keep, late


def _by_memory(keep: np.ndarray, blocks: np.ndarray, promised: np.ndarray,
               free_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the kept droppable requests holding the most blocks until the rest fit."""
    late = np.zeros(len(keep), dtype=bool)
    excess = int(blocks[keep].sum()) - free_blocks
    if excess <= 0:
        return keep, late
    candidates = np.flatnonzero(keep & ~promised)
    candidates = candidates[np.argsort(-blocks[candidates], kind="stable")]
    freed = np.cumsum(blocks[candidates])
    count = int(np.searchsorted(freed, excess)) + 1
    keep = keep.copy()
    keep[candidates[:count]] = False
    if count > len(candidates):
        late = keep & promised
    return keep, late


def _next_batch(admitted: list[str], tokens: list[int], budget: int) -> dict[str, int]:
    """The next batch's prefill: earliest deadline first, up to the budget."""
    chunks: dict[str, int] = {}
    left = budget
    for request_id, n in zip(admitted, tokens):
        if left <= 0:
            break
        chunks[request_id] = min(n, left)
        left -= chunks[request_id]
    return chunks
