"""Which role each worker plays: the planner's mode choice, a pure function of state + clock.

In colocated mode every worker runs both prefill and decode. In disaggregated mode each
worker plays its home role (the one it joined with, or one an operator gave it), except:

- A pool is lost: when no live worker can decode (or none can prefill), the workers of the
  other pool turn colocated, so requests keep flowing. Colocated does everything a prefill or
  decode worker does, so this switch is immediate.
- The pool is back: a worker that fell back returns to its home role. The state machine holds such
  a move until the worker no longer holds work its new role cannot finish.
- Rebalancing: when the prefill pool is the bottleneck (its queued prompts would take more
  than BACKLOG_S to prefill) while the decode pool is less than half full, a decode worker
  moves to prefill; when prefilled requests wait for decode room, or the decode pool is
  nearly full, while prefill keeps up, a prefill worker moves to decode. One move per
  COOLDOWN_S, and never the last worker of a pool.
"""

from __future__ import annotations

import math

from planner.prices import DEFAULT_CONTEXT, idle_step_s, max_decode_batch
from planner.state import PlannerState, WorkerState
from shared.messages import Role
from shared.roofline import Profile, prefill_budget

BACKLOG_S = 1.0
COOLDOWN_S = 5.0


def choose_roles(state: PlannerState, now: float, profile: Profile, rebalance: bool,
                 max_num_seqs: int = 64) -> dict[str, Role]:
    alive = [w for w in state.workers.values() if w.alive]
    if state.mode == "colocated":
        return {w.worker_id: "colocated" for w in alive if w.role != "colocated"}
    roles = {w.worker_id: w.role for w in alive}
    if set(roles.values()) in ({"prefill"}, {"decode"}):  # a pool is lost: both roles on every worker
        roles = {wid: "colocated" for wid in roles}
    else:
        for w in alive:
            if w.role == "colocated" and w.home_role != "colocated":
                other = "decode" if w.home_role == "prefill" else "prefill"
                if any(v.role == other for v in alive):
                    roles[w.worker_id] = w.home_role
    changes: dict[str, Role] = {wid: role for wid, role in roles.items()
                                if role != state.workers[wid].role and state.workers[wid].target_role != role}
    if not changes and rebalance and now - state.last_role_change >= COOLDOWN_S:
        changes = _rebalance(state, alive, profile, max_num_seqs)
    return changes


def _rebalance(state: PlannerState, alive: list[WorkerState], profile: Profile, max_num_seqs: int) -> dict[str, Role]:
    prefill = [w for w in alive if w.role == "prefill" and w.target_role is None]
    decode = [w for w in alive if w.role == "decode" and w.target_role is None]
    if not prefill or not decode:
        return {}
    queued = int(state.waiting.rows().prefill.sum()) + sum(
        r.prefill_left for w in prefill for r in map(state.requests.__getitem__, w.requests) if r.phase == "prefill")
    step_s = idle_step_s(profile, 0, 0)
    rate = prefill_budget(profile.model, profile.params, step_s, 0, 1.0, 0) / step_s * len(prefill)
    backlog_s = queued / rate if rate > 0 else math.inf
    held = [state.requests[r] for w in decode for r in w.requests]
    context = sum(r.prompt_len + r.num_output for r in held) / len(held) if held else DEFAULT_CONTEXT
    tpots = [t for t in (r.tpot_s for r in held) if t is not None]
    slots = len(decode) * max_decode_batch(profile, context, min(tpots, default=None), max_num_seqs)
    occupancy = len(held) / max(1, slots)
    waiting_handovers = sum(1 for w in prefill for rid in w.requests if state.requests[rid].phase == "handover")
    if backlog_s > BACKLOG_S and occupancy < 0.5 and not waiting_handovers and len(decode) >= 2:
        return {min(decode, key=lambda w: len(w.requests)).worker_id: "prefill"}
    if (waiting_handovers > len(decode) or occupancy > 0.9) and backlog_s < BACKLOG_S / 4 and len(prefill) >= 2:
        return {min(prefill, key=lambda w: len(w.requests)).worker_id: "decode"}
    return {}


def conflicts(state: PlannerState, worker: WorkerState, role: Role) -> bool:
    """Does the worker hold work that a worker of `role` could not finish?"""
    reqs = [state.requests[r] for r in worker.requests]
    if role == "prefill":
        return any(r.phase == "decode" or r.decode_worker == worker.worker_id for r in reqs)
    if role == "decode":
        return any(r.phase in ("waiting", "prefill") for r in reqs)
    return False
