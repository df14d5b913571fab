"""First come, first served, with no admission control.

Requests are placed in arrival order on the prefill-capable worker (colocated or prefill) with
the most unreserved KV blocks, each reserving blocks for what it will hold there (prompt plus
`max_tokens`; the prompt only on a prefill worker), so a worker never runs out mid-request. A
request that fits nowhere waits, and so does everyone behind it. Prefilled requests are handed
to the decode worker with the most unreserved blocks, in arrival order. Each step decodes every
running request, then fills the rest of the token budget with prefill chunks, oldest first.
Decoding requests on workers that can speculate do so with a fixed length, `spec_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.policies.base import Decisions, WorkerBatch
from planner.state import PlannerState, RequestState, WorkerState

Load = dict[str, tuple[int, int]]  # worker -> (unreserved blocks, requests)


@dataclass
class FCFSPolicy:
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    spec_len: int = 0

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        decisions = Decisions()
        load = {w.worker_id: (w.unreserved_blocks, len(w.requests)) for w in state.workers.values()}
        added: dict[str, list[str]] = {w: [] for w in load}
        alive = [w for w in state.workers.values() if w.alive]
        prefill_pool = [w for w in alive if w.role != "decode"]
        decode_pool = [w for w in alive if w.role == "decode"]
        for rid in state.waiting:
            req = state.requests[rid]
            if prefill_pool and (all(w.blocks_for(req.tokens_on(w.role)) > w.num_blocks for w in prefill_pool)
                                 or _needs_decode(prefill_pool, decode_pool, req)):
                decisions.refuse.append((rid, "request needs more KV cache than any worker has"))
                continue
            worker = self._place(req, prefill_pool, load)
            if worker is None:
                break
            decisions.assign[rid] = worker.worker_id
            added[worker.worker_id].append(rid)
        ready = sorted((r for r in state.requests.values() if r.phase == "handover"), key=lambda r: r.arrival)
        for req in ready:
            worker = self._place(req, decode_pool, load)
            if worker is None:
                break
            decisions.handover[req.request_id] = worker.worker_id
            added[worker.worker_id].append(req.request_id)

        for worker in state.idle_workers():
            batch = self._batch(state, worker, worker.requests + added[worker.worker_id], decisions)
            if batch:
                decisions.batches[worker.worker_id] = batch
        return decisions

    def _place(self, req: RequestState, pool: list[WorkerState], load: Load) -> WorkerState | None:
        """The worker with the most room that can hold the request, its load updated."""
        fits = [
            w for w in pool
            if load[w.worker_id][0] >= w.blocks_for(req.tokens_on(w.role))
            and load[w.worker_id][1] < self.max_num_seqs
        ]
        worker = max(fits, key=lambda w: load[w.worker_id][0], default=None)
        if worker is not None:
            free, count = load[worker.worker_id]
            load[worker.worker_id] = (free - worker.blocks_for(req.tokens_on(worker.role)), count + 1)
        return worker

    def _batch(self, state: PlannerState, worker: WorkerState, request_ids: list[str],
               decisions: Decisions) -> WorkerBatch:
        reqs = [state.requests[r] for r in request_ids]
        batch = WorkerBatch(decode=[
            r.request_id for r in reqs
            if (r.phase == "decode" and r.worker_id == worker.worker_id) or r.decode_worker == worker.worker_id
            or decisions.handover.get(r.request_id) == worker.worker_id
        ])
        if self.spec_len and worker.speculator != "none":
            batch.spec_lens = dict.fromkeys(batch.decode, self.spec_len)
        budget = self.max_batch_tokens - len(batch.decode)
        prefilling = (r for r in reqs if r.phase in ("waiting", "prefill") and r.prefill_left > 0)
        for req in sorted(prefilling, key=lambda r: r.arrival):
            if budget <= 0:
                break
            chunk = min(req.prefill_left, budget)
            batch.prefill.append((req.request_id, chunk))
            budget -= chunk
        return batch


def _needs_decode(prefill_pool: list[WorkerState], decode_pool: list[WorkerState], req: RequestState) -> bool:
    """Only prefill workers can take it, and no decode worker can ever hold it (with no decode
    worker up yet, it waits for one)."""
    only_prefill = all(w.role == "prefill" for w in prefill_pool)
    return only_prefill and bool(decode_pool) and all(w.blocks_for(req.max_len) > w.num_blocks for w in decode_pool)
