"""Best-effort requests in the SLO policy: where they go and when they make way. They are
placed into the slack the promises leave (a replica whose deadlines need at most `SLACK` of its
next batch's budget, with `BE_RESERVE` of its KV blocks left free for promised work), and they
are the first preempted when admitted work needs their blocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from planner.admission import Plan
from planner.decisions import Decisions
from planner.policies.placement import Load
from planner.state import PlannerState, WorkerState
from planner.waiting import Rows

SLACK = 0.5  # best-effort requests join a replica whose deadlines need at most this share of its budget
BE_RESERVE = 0.1  # share of a worker's KV blocks best-effort requests leave free for promised ones


def place_best_effort(state: PlannerState, rows: Rows, hopeful: np.ndarray, pool: list[WorkerState], load: Load,
                      plans: dict[str, Plan], decisions: Decisions, added: dict[str, list[str]], max_num_seqs: int,
                      decode_room: Callable[[WorkerState], int], plan_for: Callable[[WorkerState], Plan]) -> None:
    """Assign the `hopeful` rows, in order, each to the worker with slack that keeps the most
    free blocks once it holds it, and give it what its plan's next batch has left of its
    budget. `decode_room`: how many a worker decodes beside its TPOTs; `plan_for`: a worker's
    plan with no candidates, for those not planned yet this call (`plans` gets them)."""
    decoders: dict[str, int] = {}  # what each worker can decode beside its TPOTs: fixed in this call

    def has_room(w: WorkerState) -> bool:  # for a block, and for one more decoder beside its TPOTs
        free, count = load[w.worker_id]
        if count >= max_num_seqs or free - 1 < BE_RESERVE * w.num_blocks:
            return False
        if w.role == "prefill":
            return True
        if w.worker_id not in decoders:
            decoders[w.worker_id] = decode_room(w)
        return decoders[w.worker_id] > count

    with_slack = []
    for w in filter(has_room, pool):  # a plan only where one could be placed: a plan is the costly part
        if w.worker_id not in plans:
            plans[w.worker_id] = plan_for(w)
        if plans[w.worker_id].needed <= SLACK * plans[w.worker_id].next_budget:
            with_slack.append(w)
    # each request's blocks on each worker, as `placement.take` counts them: worked out once
    need = {w.worker_id: -(-(rows.prefill[hopeful] if w.role == "prefill" else rows.whole[hopeful])
                            // w.block_size) for w in with_slack}
    fits = [load[w.worker_id][0] - need[w.worker_id] >= BE_RESERVE * w.num_blocks for w in with_slack]
    somewhere = np.logical_or.reduce(fits) if fits else np.zeros(len(hopeful), dtype=bool)
    needs = {wid: n[somewhere].tolist() for wid, n in need.items()}  # room only shrinks: the rest never fit
    with_slack = list(filter(has_room, with_slack))
    for i, rid in enumerate(rows.ids[hopeful[somewhere]].tolist()):
        if not with_slack:
            break
        worker, most = None, -math.inf  # the one with the most free blocks once it holds the request
        for w in with_slack:
            free = load[w.worker_id][0]
            if free - needs[w.worker_id][i] >= BE_RESERVE * w.num_blocks and free > most:
                worker, most = w, free
        if worker is None:
            continue
        free, count = load[worker.worker_id]
        load[worker.worker_id] = (free - needs[worker.worker_id][i], count + 1)
        decisions.assign[rid] = worker.worker_id
        decisions.best_effort.add(rid)
        added[worker.worker_id].append(rid)
        p = plans[worker.worker_id]
        room = p.next_budget - sum(p.chunks.values())
        if room > 0:
            p.chunks[rid] = min(room, state.requests[rid].prefill_left)
        if not has_room(worker):  # only its room changed
            with_slack.remove(worker)


def make_room(state: PlannerState, worker: WorkerState, load: Load, decisions: Decisions, gone: set[str]) -> None:
    """Preempt best-effort requests, newest first, while admitted work needs their blocks."""
    free, count = load[worker.worker_id]
    movable = sorted((state.requests[r] for r in worker.requests
                      if state.requests[r].best_effort and r not in gone
                      and state.requests[r].phase in ("prefill", "decode")), key=lambda r: -r.arrival)
    for req in movable:
        if free >= 0:
            break
        decisions.preempt.append((req.request_id, "preempted for admitted work"))
        gone.add(req.request_id)
        free += req.reserved_blocks
        count -= 1
    load[worker.worker_id] = (free, count)
