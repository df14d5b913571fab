"""Sarathi-Serve: chunked prefill with a fixed token budget, decode first, stall-free.

Requests are placed first come, first served, like `fcfs`. Every step decodes every request
the worker holds, then fills the rest of a fixed `max_batch_tokens` budget with prefill
chunks, oldest request first, so a long prompt never stalls the decoding requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.decisions import Decisions, WorkerBatch
from planner.policies.placement import chunked_batch, without_admission_control
from planner.state import PlannerState, WorkerState


@dataclass
class SarathiPolicy:
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    spec_len: int = 0
    name: str = "sarathi"

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        def batch_for(worker: WorkerState, request_ids: list[str], decisions: Decisions) -> WorkerBatch:
            return chunked_batch(state, worker, request_ids, decisions, self.spec_len, self.max_batch_tokens,
                                 order=lambda r: r.arrival)

        return without_admission_control(state, self.max_num_seqs, batch_for)
