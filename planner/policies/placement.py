"""What every policy does the same way: which workers can take work, placing a request on
the worker with the most room, handing prefilled requests to decode workers, the decode half
of a batch, and preempting when a worker's requests have outgrown its KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.decisions import Decisions, WorkerBatch
from planner.state import PlannerState, RequestState, WorkerState
from planner.waiting import Rows

Load = dict[str, tuple[int, int]]  # worker -> (unreserved blocks, requests)
Routing = Literal["slack", "least-loaded", "round-robin"]  # slos routes by slack; the rest are its ablations


def load_of(state: PlannerState, gone: set[str] = frozenset()) -> Load:
    """Each worker's room, not counting the requests in `gone` (preempted in this call)."""
    load = {w.worker_id: (w.unreserved_blocks, len(w.requests)) for w in state.workers.values()}
    for rid in gone:
        req = state.requests[rid]
        free, count = load[req.worker_id]
        load[req.worker_id] = (free + req.reserved_blocks, count - 1)
    return load


def prefill_pool(state: PlannerState) -> list[WorkerState]:
    """Workers that can take new requests."""
    return [w for w in state.workers.values() if w.can_prefill and not w.draining and w.target_role is None]


def decode_pool(state: PlannerState) -> list[WorkerState]:
    """Workers that can take prefilled requests over."""
    return [w for w in state.workers.values()
            if w.alive and w.role == "decode" and not w.draining and w.target_role is None]


def fits(req: RequestState, worker: WorkerState, load: Load, max_num_seqs: int) -> bool:
    free, count = load[worker.worker_id]
    return free >= worker.blocks_for(req.tokens_on(worker.role)) and count < max_num_seqs


def take(req: RequestState, worker: WorkerState, load: Load) -> None:
    free, count = load[worker.worker_id]
    load[worker.worker_id] = (free - worker.blocks_for(req.tokens_on(worker.role)), count + 1)


def place(req: RequestState, pool: Iterable[WorkerState], load: Load, max_num_seqs: int) -> WorkerState | None:
    """The worker with the most room that can hold the request, its load updated."""
    worker = max((w for w in pool if fits(req, w, load, max_num_seqs)), key=lambda w: load[w.worker_id][0],
                 default=None)
    if worker is not None:
        take(req, worker, load)
    return worker


@dataclass(frozen=True)
class Capacity:
    """The largest KV cache (in blocks) of the live workers of each role: what a request must
    fit somewhere. Computed once per scheduling call."""

    colocated: int | None
    prefill: int | None
    decode: int | None
    block_size: int

    @classmethod
    def of(cls, state: PlannerState) -> Capacity:
        alive = [w for w in state.workers.values() if w.alive]
        largest = {role: max((w.num_blocks for w in alive if w.role == role), default=None)
                   for role in ("colocated", "prefill", "decode")}
        return cls(**largest, block_size=alive[0].block_size if alive else 16)

    def refusals(self, rows: Rows) -> list[tuple[str, str]]:
        """The waiting requests no worker could ever hold, and why (none while no worker is up)."""
        if self.colocated is None and self.prefill is None:
            return []
        whole, prompt = -(-rows.whole // self.block_size), -(-rows.prefill // self.block_size)
        colocated = whole <= self.colocated if self.colocated is not None else np.zeros(len(rows), dtype=bool)
        prefilled = prompt <= self.prefill if self.prefill is not None else np.zeros(len(rows), dtype=bool)
        decoded = whole <= self.decode if self.decode is not None else np.ones(len(rows), dtype=bool)
        out = []
        for i in np.flatnonzero(~colocated & ~(prefilled & decoded)).tolist():
            where = "any decode worker" if prefilled[i] else "any worker"
            out.append((rows.ids[i], f"request needs more KV cache than {where} has"))
        return out


def refuse_oversized(state: PlannerState, rows: Rows, decisions: Decisions) -> set[str]:
    """Refuse the waiting requests no worker could ever hold; returns their ids."""
    refused = Capacity.of(state).refusals(rows)
    decisions.refuse += refused
    return {rid for rid, _ in refused}


def admit_in_order(state: PlannerState, decisions: Decisions, load: Load, max_num_seqs: int,
                   order: Callable[[RequestState], float] | None = None) -> dict[str, list[str]]:
    """Place waiting requests in order (arrival by default) until the first that fits nowhere:
    what a server without admission control does. Returns what each worker was given."""
    added: dict[str, list[str]] = {w: [] for w in state.workers}
    pool = prefill_pool(state)
    refused = refuse_oversized(state, state.waiting.rows(), decisions)
    waiting = [state.requests[rid] for rid in state.waiting if rid not in refused]
    if order is not None:
        waiting.sort(key=order)
    for req in waiting:
        worker = place(req, pool, load, max_num_seqs)
        if worker is None:
            break
        decisions.assign[req.request_id] = worker.worker_id
        added[worker.worker_id].append(req.request_id)
    return added


def hand_over(state: PlannerState, load: Load, max_num_seqs: int, decisions: Decisions,
              added: dict[str, list[str]],
              accepts: Callable[[RequestState, WorkerState], bool] = lambda r, w: True) -> None:
    """Prefilled requests, oldest first, to the decode worker with the most room that
    `accepts` them."""
    pool = decode_pool(state)
    if not pool:
        return
    ready = sorted((state.requests[rid] for w in state.workers.values() for rid in w.requests
                    if state.requests[rid].phase == "handover"), key=lambda r: r.arrival)
    for req in ready:
        worker = place(req, [w for w in pool if accepts(req, w)], load, max_num_seqs)
        if worker is None:
            continue
        decisions.handover[req.request_id] = worker.worker_id
        added[worker.worker_id].append(req.request_id)


def decoding(state: PlannerState, worker: WorkerState, request_ids: list[str], decisions: Decisions) -> list[str]:
    """The requests that decode on the worker in its next step, those it takes over included."""
    me, handover = worker.worker_id, decisions.handover
    return [
        r.request_id for r in map(state.requests.__getitem__, request_ids)
        if (r.phase == "decode" and r.worker_id == me) or r.decode_worker == me or handover.get(r.request_id) == me
    ]


def decode_batch(state: PlannerState, worker: WorkerState, request_ids: list[str], decisions: Decisions,
                 spec_len: int) -> WorkerBatch:
    """Every request decoding on the worker, each speculating `spec_len` tokens where the
    worker can."""
    batch = WorkerBatch(decode=decoding(state, worker, request_ids, decisions))
    if spec_len and worker.speculator != "none":
        batch.spec_lens = dict.fromkeys(batch.decode, spec_len)
    return batch


def chunked_batch(state: PlannerState, worker: WorkerState, request_ids: list[str], decisions: Decisions,
                  spec_len: int, max_batch_tokens: int, order: Callable[[RequestState], object]) -> WorkerBatch:
    """Decode first, then prefill chunks in `order` up to a fixed token budget (Sarathi's step)."""
    batch = decode_batch(state, worker, request_ids, decisions, spec_len)
    budget = max_batch_tokens - len(batch.decode) - sum(batch.spec_lens.values())
    for req in sorted(prefilling(state, request_ids), key=order):
        if budget <= 0:
            break
        chunk = min(req.prefill_left, budget)
        batch.prefill.append((req.request_id, chunk))
        budget -= chunk
    return batch


def without_admission_control(state: PlannerState, max_num_seqs: int,
                              batch_for: Callable[[WorkerState, list[str], Decisions], WorkerBatch]) -> Decisions:
    """What a server without admission control does: preempt where memory overflows, place
    requests in arrival order while they fit, hand prefilled ones over, and give each idle
    worker the batch `batch_for` makes of what it holds."""
    decisions = Decisions()
    gone = relieve_memory(state, decisions)
    load = load_of(state, gone)
    added = admit_in_order(state, decisions, load, max_num_seqs)
    hand_over(state, load, max_num_seqs, decisions, added)
    for worker in state.idle_workers():
        batch = batch_for(worker, [r for r in worker.requests + added[worker.worker_id] if r not in gone], decisions)
        if batch:
            decisions.batches[worker.worker_id] = batch
    return decisions


def prefilling(state: PlannerState, request_ids: list[str]) -> list[RequestState]:
    reqs = (state.requests[r] for r in request_ids)
    return [r for r in reqs if r.phase in ("waiting", "prefill") and r.prefill_left > 0]


def newest_first(req: RequestState) -> tuple[bool, float]:
    """vLLM's order of preemption (best-effort requests before any)."""
    return not req.best_effort, -req.arrival


def relieve_memory(state: PlannerState, decisions: Decisions,
                   order: Callable[[RequestState], tuple] = newest_first) -> set[str]:
    """Where requests have outgrown a worker's KV cache, preempt in `order` until the rest fit.
    The gateway resubmits them after the tokens already streamed. Returns the preempted."""
    for worker in state.workers.values():
        excess = worker.reserved_blocks - worker.num_blocks
        if excess <= 0 or not worker.alive:
            continue
        movable = [req for req in map(state.requests.__getitem__, worker.requests)
                   if req.phase in ("prefill", "decode") and req.worker_id == worker.worker_id]
        for req in sorted(movable, key=order):
            if excess <= 0 or len(movable) == 1:
                break
            decisions.preempt.append((req.request_id, f"worker {worker.worker_id} ran short of KV blocks"))
            excess -= req.reserved_blocks
            movable.remove(req)
    return {rid for rid, _ in decisions.preempt}


def homes(routing: Routing, rows: Rows, pool: list[WorkerState], load: Load) -> np.ndarray:
    """Each waiting request's one replica, for the routing ablations of `slos`: in turn by
    arrival (round robin), or, in arrival order, the one with the most free KV, as the
    baselines place requests (least loaded)."""
    ids = sorted(w.worker_id for w in pool)
    if routing == "round-robin":
        return np.array(ids, dtype=object)[rows.order % len(ids)]
    free = {w.worker_id: load[w.worker_id][0] * w.block_size for w in pool}
    out = np.empty(len(rows), dtype=object)
    for i, tokens in enumerate(rows.whole.tolist()):
        out[i] = max(ids, key=free.__getitem__)
        free[out[i]] -= tokens
    return out
