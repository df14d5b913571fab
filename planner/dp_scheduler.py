"""Admission and prefill planning for one replica: which waiting requests can be promised
their TTFT without breaking any running request's TPOT, and how many prefill tokens each
upcoming batch gives each of them.

Batches repeat every `step_s`, the tightest TPOT among the requests decoding (a batch must end
before any of them is late for its next token). The performance model says how many prefill
tokens fit in such a batch beside the decode work: the per-batch budget. A set of requests is
feasible when, taken in deadline order, the prefill tokens of each request and of all those
before it fit in the budgets of the batches that end before its deadline, and their KV blocks
fit in memory. Among feasible sets the planner keeps the largest: in deadline order it adds
each request and, when the set stops being feasible, drops the one whose removal frees the
most of what ran out (prefill tokens, or blocks). With tokens alone this is Moore and
Hodgson's rule, which admits the most requests possible. Requests already promised are never
dropped. Each TPOT tier is tried as the batch period (a tighter one admits tight requests but
shrinks every budget) and the tier admitting the most wins.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from shared.roofline import Profile, prefill_budget


@dataclass(frozen=True)
class Job:
    """A request that still has prompt to prefill."""

    request_id: str
    prefill_tokens: int
    blocks: int  # KV blocks it will hold at most
    deadline: float  # absolute TTFT deadline; inf when it has none
    tpot_s: float | None  # its decode objective; None when it has none
    promised: bool = False  # admitted earlier: never dropped


@dataclass(frozen=True)
class Replica:
    """What is running on one replica: the decode work every batch carries."""

    decoding: int  # requests decoding
    context_tokens: int  # their KV tokens, read by every decode step
    tightest_tpot_s: float | None
    free_blocks: int  # not held by running requests
    max_num_seqs: int = 256


@dataclass
class Plan:
    admitted: list[str]  # in deadline order
    rejected: list[str]  # do not fit now: park them or refuse
    step_s: float  # batch period
    budget: int  # prefill tokens per batch
    chunks: dict[str, int] = field(default_factory=dict)  # prefill tokens in the next batch
    late: list[str] = field(default_factory=list)  # promised, but now past what fits


IDLE_STEP_S = 0.05  # batch period with nothing to pace it


@dataclass(frozen=True)
class _Queue:
    """The jobs as arrays in deadline order (promised first among equals), built once per call."""

    ids: list[str]
    tokens: np.ndarray
    blocks: np.ndarray
    deadline: np.ndarray
    tpot: np.ndarray  # nan for none
    promised: np.ndarray

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
        )


def plan(profile: Profile, replica: Replica, jobs: list[Job], now: float) -> Plan:
    queue = _Queue.of(jobs)
    tiers = sorted(set(queue.tpot[~np.isnan(queue.tpot)].tolist())
                   | ({replica.tightest_tpot_s} if replica.tightest_tpot_s else set()))
    floor = replica.tightest_tpot_s or math.inf
    periods = [t for t in tiers if t <= floor] or [min(floor, IDLE_STEP_S)]
    best: Plan | None = None
    for step_s in reversed(periods):  # on a tie the longer period wins: bigger budgets, more slack
        candidate = _plan_at(profile, replica, queue, now, step_s)
        if best is None or len(candidate.admitted) > len(best.admitted):
            best = candidate
    assert best is not None
    return best


def _plan_at(profile: Profile, replica: Replica, queue: _Queue, now: float, step_s: float) -> Plan:
    with np.errstate(invalid="ignore"):
        eligible = queue.promised | np.isnan(queue.tpot) | (queue.tpot >= step_s)
    rows = np.flatnonzero(eligible)
    budget = batch_budget(profile, replica, step_s, int(queue.promised.sum()))
    tokens, promised = queue.tokens[rows], queue.promised[rows]
    keep, late = _by_deadline(tokens, promised, _batches(queue.deadline[rows], now, step_s), budget)
    keep, late_mem = _by_memory(keep, queue.blocks[rows], promised, replica.free_blocks)
    kept = rows[keep]
    admitted = [queue.ids[i] for i in kept.tolist()]
    rejected_rows = np.sort(np.concatenate([np.flatnonzero(~eligible), rows[~keep]]))
    return Plan(
        admitted=admitted,
        rejected=[queue.ids[i] for i in rejected_rows.tolist()],
        step_s=step_s,
        budget=budget,
        chunks=_next_batch(admitted, queue.tokens[kept].tolist(), budget),
        late=[queue.ids[i] for i in rows[late | late_mem].tolist()],
    )


def batch_budget(profile: Profile, replica: Replica, step_s: float, joining: int) -> int:
    """Prefill tokens per batch beside the decode work of the running requests and of
    `joining` more (promised ones, about to decode), each with the running ones' mean context."""
    seqs = min(replica.max_num_seqs, replica.decoding + joining)
    context = replica.context_tokens + (seqs - replica.decoding) * replica.context_tokens / max(1, replica.decoding)
    return prefill_budget(profile.model, profile.params, step_s, seqs, 1.0, context)


def _batches(deadlines: np.ndarray, now: float, step_s: float) -> np.ndarray:
    """Batches that end by each deadline (a large number for none)."""
    finite = np.isfinite(deadlines)
    out = np.full(len(deadlines), np.iinfo(np.int64).max // 4, dtype=np.int64)
    out[finite] = np.maximum(0, np.floor((deadlines[finite] - now) / step_s)).astype(np.int64)
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
