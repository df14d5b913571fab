"""First come, first served, prefill first: what vLLM does without chunked prefill, and, on
disaggregated pools, what DistServe does.

No admission control: requests are placed in arrival order while a worker has KV room for
them (the first that fits nowhere blocks those behind it). A worker with prompts to prefill
runs them whole, oldest first, up to `max_batch_tokens` (a longer prompt runs alone); only
when none is left does it decode every request it holds. Prefill workers only ever prefill
and decode workers only ever decode, so on disaggregated pools this is DistServe's FCFS per
pool with a static split.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.decisions import Decisions, WorkerBatch
from planner.policies.placement import decode_batch, prefilling, without_admission_control
from planner.state import PlannerState, WorkerState


@dataclass
class FCFSPolicy:
    max_batch_tokens: int = 2048
    max_num_seqs: int = 64
    spec_len: int = 0
    name: str = "fcfs"

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        def batch_for(worker: WorkerState, request_ids: list[str], decisions: Decisions) -> WorkerBatch:
            batch, budget = WorkerBatch(), self.max_batch_tokens
            for req in sorted(prefilling(state, request_ids), key=lambda r: r.arrival):
                if batch.prefill and req.prefill_left > budget:
                    break
                batch.prefill.append((req.request_id, req.prefill_left))
                budget -= req.prefill_left
            return batch if batch.prefill else decode_batch(state, worker, request_ids, decisions, self.spec_len)

        return without_admission_control(state, self.max_num_seqs, batch_for)


@dataclass
class DistServePolicy(FCFSPolicy):
    """FCFS on disaggregated pools; the planner refuses to run it on colocated workers."""

    name: str = "distserve"
