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
deadline, and their KV blocks fit in memory. Among feasible sets the planner keeps the
largest: in deadline order it adds each request and, when the set stops being feasible, drops
the one whose removal frees the most of what ran out (prefill tokens, or blocks). With tokens
alone this is Moore and Hodgson's rule, which admits the most requests possible. Requests
already promised are never dropped. Each TPOT tier is tried as the batch period (a tighter
one admits tight requests but shrinks every budget) and the tier admitting the most wins;
then the budget is priced again with the decode work of what it admits, which may only
shrink it, and the plan redone at that budget, so the promise holds once they decode too.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from planner.spec_choice import choose_spec_len
from shared.roofline import Batches, Profile, prefill_budget

IDLE_STEP_S = 0.05  # batch period with no TPOT to pace it
SEARCH_STEPS = 6  # bisection steps when pricing the decode work of what is admitted
DEFAULT_CONTEXT = 512  # context assumed for a decoding request when nothing else says


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


@dataclass(frozen=True)
class _Queue:
    """The jobs as arrays in deadline order (promised first among equals), built once per call."""

    ids: list[str]
    tokens: np.ndarray
    blocks: np.ndarray
    deadline: np.ndarray
    tpot: np.ndarray  # nan for none
    promised: np.ndarray
    context: np.ndarray

    @classmethod
    def of(cls, jobs: list[Job]) -> _Queue:
        n = len(jobs)
        deadline = np.fromiter((j.deadline for j in jobs), np.float64, n)
        promised = np.fromiter((j.promised for j in jobs), bool, n)
        order = np.lexsort((~promised, deadline))
        return cls(
            ids=[jobs[i].request_id for i in order.tolist()],
            tokens=np.fromiter((j.prefill_tokens for j in jobs), np.int64, n)[order],
            blocks=np.fromiter((j.blocks for j in jobs), np.int64, n)[order],
            deadline=deadline[order],
            tpot=np.fromiter((math.nan if j.tpot_s is None else j.tpot_s for j in jobs), np.float64, n)[order],
            promised=promised[order],
            context=np.fromiter((j.context for j in jobs), np.int64, n)[order],
        )


def plan(profile: Profile, replica: Replica, jobs: list[Job], now: float) -> Plan:
    queue = _Queue.of(jobs)
    promised = int(queue.promised.sum())
    promised_context = int(queue.context[queue.promised].sum())
    tiers: list[float | None] = [None]
    if not replica.prefill_only:
        with np.errstate(invalid="ignore"):
            floor = min(replica.tightest_tpot_s or math.inf,
                        float(np.nanmin(queue.tpot[queue.promised], initial=math.inf)))
        found = set(queue.tpot[~np.isnan(queue.tpot)].tolist())
        tiers = sorted(t for t in found | {floor} if t <= floor and math.isfinite(t)) or [None]
    best: Plan | None = None
    best_tier: float | None = None
    for tier in reversed(tiers):  # on a tie the longer period wins: bigger budgets, more slack
        eligible = _eligible(queue, tier)
        if best is not None and int(eligible.sum()) <= len(best.admitted):
            continue  # cannot admit more than the best so far
        candidate = _plan_at(queue, eligible, _period(profile, replica, tier, promised, promised_context), replica, now)
        if best is None or len(candidate.admitted) > len(best.admitted):
            best, best_tier = candidate, tier
    assert best is not None
    eligible = _eligible(queue, best_tier)
    now_budget = _period(profile, replica, best_tier, 0, 0).budget  # the next batch decodes only what runs now
    joining = len(best.admitted) - promised
    if joining and not replica.prefill_only:
        best = _with_their_decode_work(profile, replica, queue, eligible, best, best_tier, now)
    best.next_budget = max(now_budget, best.budget)
    best.chunks = _next_batch(best.admitted, best.admitted_tokens, best.next_budget)
    return best


def _eligible(queue: _Queue, tier: float | None) -> np.ndarray:
    """Requests a batch period of `tier` can serve: those with no TPOT, a looser one, or promised."""
    if tier is None:
        return np.ones(len(queue.ids), dtype=bool)
    with np.errstate(invalid="ignore"):
        return queue.promised | np.isnan(queue.tpot) | (queue.tpot >= tier)


def _with_their_decode_work(profile: Profile, replica: Replica, queue: _Queue, eligible: np.ndarray, first: Plan,
                            tier: float | None, now: float) -> Plan:
    """The most new requests n such that the plan, priced with the decode work of the
    promised requests and of n new ones, still admits n; by bisection from the plan priced
    without theirs (which admitted the most it ever can)."""
    promised = int(queue.promised.sum())
    context = int(queue.context[queue.promised].sum())
    new = ~queue.promised & np.isin(queue.ids, first.admitted)
    per_new = float(queue.context[new].mean()) if new.any() else 0.0
    lo, hi = 0, int(new.sum())
    found = None
    for _ in range(SEARCH_STEPS):
        if lo >= hi:
            break
        mid = (lo + hi + 1) // 2
        candidate = _plan_at(queue, eligible, _period(profile, replica, tier, promised + mid,
                                                      context + round(per_new * mid)), replica, now, mid)
        if len(candidate.admitted) - promised >= mid:
            lo, found = mid, candidate
        else:
            hi = mid - 1
    if found is None or len(found.admitted) - promised != lo:
        found = _plan_at(queue, eligible, _period(profile, replica, tier, promised + lo, context + round(per_new * lo)),
                         replica, now, lo)
    return found


def max_decode_batch(profile: Profile, context: float, tpot_s: float | None, max_num_seqs: int) -> int:
    """The most sequences of `context` tokens a plain decode step can hold and still last at
    most `tpot_s`."""
    if tpot_s is None:
        return max_num_seqs
    seqs = np.arange(1, max_num_seqs + 1)
    times = profile.predict(Batches.of(decode_seqs=seqs, kv_read=seqs * context, attention_pairs=seqs * context))
    return int((times <= tpot_s).sum())


def _period(profile: Profile, replica: Replica, tpot_s: float | None, joining: int, joining_context: int) -> Period:
    """The batch period and prefill budget at TPOT `tpot_s`, with the running requests and
    `joining` more (reading `joining_context` KV tokens a step) decoding; None: nothing paces
    the batches."""
    seqs = 0 if replica.prefill_only else replica.decoding + joining
    kv_read = 0 if replica.prefill_only else replica.context_tokens + joining_context
    if replica.prefill_only or tpot_s is None:
        step_s = IDLE_STEP_S if tpot_s is None else tpot_s
        return Period(step_s, prefill_budget(profile.model, profile.params, step_s, seqs, 1.0, kv_read), 0)
    choice = choose_spec_len(profile, tpot_s, seqs, round(kv_read / max(1, seqs)), replica.alpha, replica.draft,
                             replica.max_spec_len)
    if choice is None:  # not even the running requests keep this TPOT
        return Period(tpot_s, 0, 0)
    return Period(choice.step_s, round(choice.prefill_tokens_per_s * choice.step_s), choice.k)


def _plan_at(queue: _Queue, eligible: np.ndarray, period: Period, replica: Replica, now: float,
             limit: int | None = None) -> Plan:
    """The largest feasible set at this period and budget, with at most `limit` new requests."""
    rows = np.flatnonzero(eligible)
    tokens, promised = queue.tokens[rows], queue.promised[rows]
    batches = _batches(queue.deadline[rows], now, period.step_s, replica.busy)
    keep, late = _by_deadline(tokens, promised, batches, period.budget)
    keep, late_mem = _by_memory(keep, queue.blocks[rows], promised, replica.free_blocks)
    cap = replica.max_num_seqs - replica.decoding - int(promised.sum())
    for bound in (replica.max_new, limit):
        if bound is not None:
            cap = min(cap, bound)
    extra = np.flatnonzero(keep & ~promised)[max(0, cap):]  # latest deadlines beyond the cap
    keep[extra] = False
    kept = rows[keep]
    admitted = [queue.ids[i] for i in kept.tolist()]
    behind = np.cumsum(tokens[keep]) - np.maximum(batches[keep] - 1, 0).astype(np.float64) * period.budget
    rejected_rows = np.sort(np.concatenate([np.flatnonzero(~eligible), rows[~keep]]))
    return Plan(
        admitted=admitted,
        admitted_tokens=queue.tokens[kept].tolist(),
        rejected=[queue.ids[i] for i in rejected_rows.tolist()],
        step_s=period.step_s,
        budget=period.budget,
        spec_len=period.spec_len,
        needed=int(max(0.0, behind.max(initial=0.0))),
        late=[queue.ids[i] for i in rows[late | late_mem].tolist()],
    )


def _batches(deadlines: np.ndarray, now: float, step_s: float, busy: bool) -> np.ndarray:
    """Batches that end by each deadline (a large number for none); one fewer while a step
    is still running."""
    finite = np.isfinite(deadlines)
    out = np.full(len(deadlines), np.iinfo(np.int64).max // 4, dtype=np.int64)
    out[finite] = np.maximum(0, np.floor((deadlines[finite] - now) / step_s).astype(np.int64) - int(busy))
    return out


def _by_deadline(tokens: np.ndarray, promised: np.ndarray, batches: np.ndarray,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Moore and Hodgson's rule: in deadline order add each request, and while the tokens no
    longer fit its capacity drop the largest droppable prompt kept so far. Returns the kept
    mask and the promised requests that do not fit even so."""
    n = len(tokens)
    keep = np.ones(n, dtype=bool)
    capacity = batches.astype(np.float64) * budget
    fits = np.cumsum(tokens) <= capacity
    if fits.all():
        return keep, np.zeros(n, dtype=bool)  # the common case: everyone fits
    first = int(np.argmin(fits))  # everything before the first overflow is kept as it is
    heap = [(-t, i) for i, t in enumerate(tokens[:first].tolist()) if not promised[i]]
    heapq.heapify(heap)
    used = int(tokens[:first].sum())
    token_list, promised_list, capacity_list = tokens.tolist(), promised.tolist(), capacity.tolist()
    for i in range(first, n):
        used += token_list[i]
        if not promised_list[i]:
            heapq.heappush(heap, (-token_list[i], i))
        while used > capacity_list[i] and heap:
            size, drop = heapq.heappop(heap)
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
