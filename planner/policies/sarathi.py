"""Sarathi-Serve: chunked prefill with a fixed token budget, decode first, stall-free.

Requests are placed first come, first served, like `fcfs`. Every step decodes every request
the worker holds, then fills the rest of a fixed `max_batch_tokens` budget with prefill
chunks, oldest request first, so a long prompt never stalls the decoding requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.policies.base import Decisions
from planner.policies.placement import (
    admit_in_order,
    decode_batch,
    hand_over,
    load_of,
    prefilling,
    relieve_memory,
)
from planner.state import PlannerState


@dataclass
class SarathiPolicy:
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    spec_len: int = 0
    name: str = "sarathi"

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        decisions = Decisions()
        gone = relieve_memory(state, decisions)
        load = load_of(state, gone)
        added = admit_in_order(state, decisions, load, self.max_num_seqs)
        hand_over(state, load, self.max_num_seqs, decisions, added)
        for worker in state.idle_workers():
            request_ids = [r for r in worker.requests + added[worker.worker_id] if r not in gone]
            batch = decode_batch(state, worker, request_ids, decisions, self.spec_len)
            budget = self.max_batch_tokens - len(batch.decode) - sum(batch.spec_lens.values())
            for req in sorted(prefilling(state, request_ids), key=lambda r: r.arrival):
                if budget <= 0:
                    break
                chunk = min(req.prefill_left, budget)
                batch.prefill.append((req.request_id, chunk))
                budget -= chunk
            if batch:
                decisions.batches[worker.worker_id] = batch
        return decisions
