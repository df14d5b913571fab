"""Earliest deadline first with early rejection: the strongest simple SLO-aware rival (what
SCORPIO and the Kubernetes inference gateway do).

Waiting requests are taken in TTFT-deadline order. Each goes to the worker that would finish
its prompt soonest: the prefill tokens queued there with earlier deadlines, plus its own, at
the prefill rate the worker has left beside its decode work (by the performance model). If
even that worker would finish after the deadline, or the deadline has passed, the request is
refused at once rather than served late. Steps decode everything first and fill a fixed token
budget with prefill chunks, earliest deadline first.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.decisions import Decisions
from planner.policies.placement import (
    chunked_batch,
    fits,
    hand_over,
    load_of,
    prefill_pool,
    prefilling,
    refuse_oversized,
    relieve_memory,
    take,
)
from planner.state import PlannerState, WorkerState
from shared.roofline import Batches, Profile


@dataclass
class EDFPolicy:
    profile: Profile
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    spec_len: int = 0
    name: str = "edf"

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        decisions = Decisions()
        gone = relieve_memory(state, decisions)
        load = load_of(state, gone)
        pool = prefill_pool(state)
        queued: dict[str, list[tuple[float, int]]] = {}  # worker -> (deadline, prefill tokens left)
        for w in pool:
            queued[w.worker_id] = []
            for r in prefilling(state, [r for r in w.requests if r not in gone]):
                if r.num_computed == 0 and not r.delivered and r.deadline < now:
                    decisions.refuse.append((r.request_id, "its TTFT deadline passed before its prefill began"))
                else:
                    queued[w.worker_id].append((r.deadline, r.prefill_left))
        rates = {w.worker_id: self._prefill_rate(state, w, gone) for w in pool}
        added: dict[str, list[str]] = {w: [] for w in state.workers}
        refused = refuse_oversized(state, state.waiting.rows(), decisions)
        waiting = (state.requests[r] for r in state.waiting if r not in refused)
        for req in sorted(waiting, key=lambda r: (r.deadline, r.arrival)):
            if req.deadline < now:
                decisions.refuse.append((req.request_id, "its TTFT deadline has passed"))
                continue
            options = [w for w in pool if fits(req, w, load, self.max_num_seqs)]
            if not options:
                continue
            finish = {w.worker_id: now + (sum(n for d, n in queued[w.worker_id] if d <= req.deadline)
                                          + req.prefill_left) / rates[w.worker_id] for w in options}
            worker = min(options, key=lambda w: finish[w.worker_id])
            if finish[worker.worker_id] > req.deadline:
                decisions.refuse.append((req.request_id, "no worker can finish its prompt by its TTFT deadline"))
                continue
            take(req, worker, load)
            queued[worker.worker_id].append((req.deadline, req.prefill_left))
            decisions.assign[req.request_id] = worker.worker_id
            added[worker.worker_id].append(req.request_id)
        hand_over(state, load, self.max_num_seqs, decisions, added)
        gone |= {rid for rid, _ in decisions.refuse}
        for worker in state.idle_workers():
            request_ids = [r for r in worker.requests + added[worker.worker_id] if r not in gone]
            batch = chunked_batch(state, worker, request_ids, decisions, self.spec_len, self.max_batch_tokens,
                                  order=lambda r: (r.deadline, r.arrival))
            if batch:
                decisions.batches[worker.worker_id] = batch
        return decisions

    def _prefill_rate(self, state: PlannerState, worker: WorkerState, gone: set[str]) -> float:
        """Prefill tokens per second beside the worker's decode work, in steps of the budget."""
        decoding = [state.requests[r] for r in worker.requests if state.requests[r].phase == "decode" and r not in gone]
        prefill = max(1, self.max_batch_tokens - len(decoding))
        context = sum(r.prefill_len + r.num_output for r in decoding)
        profile = worker.fit.fitted(self.profile)
        step_s = float(profile.predict(Batches.of(prefill_tokens=prefill, decode_seqs=len(decoding), kv_read=context,
                                                  num_seqs=len(decoding) + 1, attention_pairs=context)))
        return prefill / step_s
