"""Objectives no worker could keep: refused at once (HTTP 429 with the reason), or served best
effort where the request asked for that (`SLOSpec.serve_unmeetable`). Waiting would not help
them, and admitting them would break a promise."""

from __future__ import annotations

import numpy as np

from planner.calibration import MIN_STEPS
from planner.decisions import Decisions
from planner.policies.placement import prefill_pool
from planner.policies.speculation import acceptance
from planner.spec_choice import fastest_token_s
from planner.state import PlannerState
from planner.waiting import Rows
from shared.roofline import Batches, Profile


def refuse_unmeetable(state: PlannerState, rows: Rows, decisions: Decisions, profile: Profile,
                      draft: Profile | None, max_spec_len: int, prior_alpha: float) -> set[str]:
    """Refuse the newly waiting requests whose objectives no worker could keep even running
    them alone, as its steps run on average: a TPOT below the fastest it decodes a token
    (`spec_choice.fastest_token_s`), or, before its first token, a TTFT shorter than its
    prompt's prefill in one step (judged from its arrival: a request back from a
    preemption is late, not unmeetable). One that asked to be served anyway is parked, to be
    served best effort. Workers that have not run enough steps to be known refuse nothing:
    the request waits for a plan instead. Returns their ids."""
    fresh = np.flatnonzero(~rows.parked & ~rows.plain())
    pool = [w for w in prefill_pool(state) if w.fit.seen >= MIN_STEPS]
    if not len(fresh) or not pool:
        return set()
    spec = any(w.speculator != "none" for w in pool) and max_spec_len > 0
    known = (acceptance(state, c, prior_alpha) for c in state.speculation)  # worked out only if spec
    alpha = max([prior_alpha, *known]) if spec else 0.0
    draft = draft if any(w.speculator == "draft" for w in pool) else None
    fitted = [w.fit.fitted(profile) for w in pool]
    fastest = np.min([fastest_token_s(f, rows.context[fresh], alpha, draft, max_spec_len if spec else 0)
                      for f in fitted], axis=0)
    tokens = rows.prefill[fresh]
    alone = Batches.of(prefill_tokens=tokens, num_seqs=1, attention_pairs=tokens * (tokens + 1) / 2)
    prefill_s = np.min([f.predict(alone) for f in fitted], axis=0)
    out = set()
    for i, rid in enumerate(rows.ids[fresh].tolist()):
        req, tpot = state.requests[rid], float(rows.tpot[fresh[i]])
        ttft_s = float(rows.deadline[fresh[i]]) - req.arrival
        if tpot < fastest[i]:
            why = f"its TPOT of {tpot * 1e3:.3g} ms is below the fastest a worker here decodes, " \
                  f"{fastest[i] * 1e3:.3g} ms a token"
        elif req.num_output == 0 and prefill_s[i] > ttft_s:
            why = f"its TTFT of {ttft_s * 1e3:.3g} ms is shorter than the {prefill_s[i] * 1e3:.3g} ms its " \
                  f"{int(tokens[i])}-token prompt takes to prefill on a worker here alone"
        else:
            continue
        if req.serve_unmeetable:
            decisions.park.append((rid, f"{why}; served best effort, as it asked"))
        else:
            decisions.refuse.append((rid, why))
        out.add(rid)
    return out
