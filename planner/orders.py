"""What a worker is told to run: the batch order for a policy's batch, carrying the prompts the
worker has not been sent yet and the KV it must import for requests it takes over."""

from __future__ import annotations

import logging

from planner.decisions import WorkerBatch
from planner.state import PlannerState
from shared.messages import BatchOrder, NewRequest, PrefillChunk

log = logging.getLogger(__name__)


def batch_order(state: PlannerState, worker_id: str, batch: WorkerBatch, step_id: int,
                policy_name: str) -> BatchOrder:
    """The order for step `step_id`; marks the prompts and imports it carries as sent. Requests
    the worker does not hold are left out (a policy bug must not take the planner down)."""
    held = set(state.workers[worker_id].requests)
    stray = [] if held.issuperset(batch.decode) and held.issuperset(r for r, _ in batch.prefill) else \
        [rid for rid in [r for r, _ in batch.prefill] + batch.decode if rid not in held]
    if stray:
        log.error("policy %s ordered requests worker %s does not hold: %s", policy_name, worker_id, stray)
        batch = WorkerBatch([(r, n) for r, n in batch.prefill if r in held], [r for r in batch.decode if r in held],
                            {r: k for r, k in batch.spec_lens.items() if r in held})
    new = []
    for rid, _ in batch.prefill:
        req = state.requests[rid]
        if not req.delivered:
            new.append(NewRequest(rid, list(req.prompt_token_ids), req.params, list(req.resume_token_ids)))
            req.first_step = step_id
    imports = []
    for req in map(state.requests.__getitem__, batch.decode):
        handover = req.handover
        if handover is not None and handover.decode_worker == worker_id and not handover.import_sent:
            imports.append(handover.export)
            handover.import_sent = True
    return BatchOrder(
        step_id=step_id,
        new_requests=new,
        prefill=[PrefillChunk(rid, n) for rid, n in batch.prefill],
        decode=batch.decode,
        spec_lens=batch.spec_lens,
        kv_imports=imports,
    )
