"""First come, first served, with no admission control.

Requests are placed in arrival order on the worker with the most unreserved KV blocks, each
reserving blocks for its prompt plus `max_tokens`, so a worker never runs out mid-request. A
request that fits nowhere waits, and so does everyone behind it. Each step decodes every
running request, then fills the rest of the token budget with prefill chunks, oldest first.
Decoding requests on workers that can speculate do so with a fixed length, `spec_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.policies.base import Decisions, WorkerBatch
from planner.state import PlannerState, RequestState, WorkerState


@dataclass
class FCFSPolicy:
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    spec_len: int = 0

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        decisions = Decisions()
        load = {w.worker_id: (w.unreserved_blocks, len(w.requests)) for w in state.workers.values()}
        placed: dict[str, list[str]] = {w: [] for w in load}
        alive = [w for w in state.workers.values() if w.alive]
        for rid in state.waiting:
            req = state.requests[rid]
            if alive and all(req.max_len > w.num_blocks * w.block_size for w in alive):
                decisions.refuse.append((rid, "request needs more KV cache than any worker has"))
                continue
            worker = self._place(req, alive, load)
            if worker is None:
                break
            free, count = load[worker.worker_id]
            load[worker.worker_id] = (free - worker.blocks_for(req.max_len), count + 1)
            decisions.assign[rid] = worker.worker_id
            placed[worker.worker_id].append(rid)

        for worker in state.idle_workers():
            batch = self._batch(state, worker, worker.requests + placed[worker.worker_id])
            if batch:
                decisions.batches[worker.worker_id] = batch
        return decisions

    def _place(
        self, req: RequestState, alive: list[WorkerState], load: dict[str, tuple[int, int]]
    ) -> WorkerState | None:
        fits = [
            w for w in alive
            if load[w.worker_id][0] >= w.blocks_for(req.max_len)
            and load[w.worker_id][1] < self.max_num_seqs
        ]
        return max(fits, key=lambda w: load[w.worker_id][0], default=None)

    def _batch(self, state: PlannerState, worker: WorkerState, request_ids: list[str]) -> WorkerBatch:
        reqs = [state.requests[r] for r in request_ids]
        batch = WorkerBatch(decode=[r.request_id for r in reqs if r.phase == "decode"])
        if self.spec_len and worker.speculator != "none":
            batch.spec_lens = dict.fromkeys(batch.decode, self.spec_len)
        budget = self.max_batch_tokens - len(batch.decode)
        for req in sorted((r for r in reqs if r.phase != "decode"), key=lambda r: r.arrival):
            if budget <= 0:
                break
            chunk = min(req.prefill_left, budget)
            batch.prefill.append((req.request_id, chunk))
            budget -= chunk
        return batch
