"""The SLO policy's speculative lengths per decoding request: the fewest tokens that keep each
request's TPOT at the batch period (more while it runs behind), raised where a longer proposal
decodes faster within the period. Acceptance per SLO class comes from the workers' reports
(`PlannerState.acceptance`), a prior until a class has enough of them."""

from __future__ import annotations

import bisect

import numpy as np

from planner.costs import batch_shape
from planner.decisions import WorkerBatch
from planner.spec_choice import fastest_floor, gains_row, promised_gains_row
from planner.state import PlannerState
from shared.roofline import Batches, Profile

NO_PREFILL = Batches.of(verify_len=0)  # the prefill part of a step without any
MIN_PROPOSED = 50  # speculative tokens a class must have verified before its own rate counts
CATCH_UP_STEPS = 4  # steps over which a request behind its TPOT speculates to make the lag up


def acceptance(state: PlannerState, slo_class: str | None, prior: float) -> float:
    """The per-token acceptance of the class's proposals: from its reports, else `prior`.

    Each verification accepts proposals one by one until the first it turns down, so the
    likeliest per-token acceptance is the tokens accepted over those accepted and the
    rejections. The share of proposals accepted says less: a step of k proposals accepts a
    smaller share the longer k, so a class that speculated long (to catch up) read as one
    that accepts less."""
    counts = state.acceptance(slo_class)
    if counts.proposed < MIN_PROPOSED:
        return prior
    return counts.accepted / max(1, counts.accepted + counts.rejected)


def spec_lens(state: PlannerState, decode: list[str], step_s: float, max_spec_len: int,
              prior: float, catch_up: bool = True) -> dict[str, int]:
    """For each decoding request, the fewest speculative tokens that keep its TPOT at this
    period (the most when none does); none for requests without a TPOT. With `catch_up`, a
    request whose tokens so far run behind its TPOT (acceptance is a draw, and a short output
    has few steps to even out) asks for enough to make that up over CATCH_UP_STEPS."""
    out: dict[str, int] = {}
    gains: dict[str | None, list[float]] = {}  # per class: tokens a step yields at k = 0, 1, ...
    for rid in decode:
        req = state.requests[rid]
        tpot = req.tpot_s
        if tpot is None:
            continue
        lag = max(0.0, req.tracker.lag_s()) if catch_up else 0.0
        need = (step_s + lag / CATCH_UP_STEPS) / tpot  # tokens a step
        if need <= 1.0:  # the request keeps its TPOT without speculating
            continue
        gain = gains.get(req.slo_class)
        if gain is None:
            gain = gains[req.slo_class] = promised_gains_row(acceptance(state, req.slo_class, prior),
                                                             max_spec_len)[0].tolist()
        k = bisect.bisect_left(gain, need * (1 - 1e-9))  # a period set to k's yield must give k
        k = min(k, len(gain) - 1)  # no k keeps up: the most
        if k:
            out[rid] = k
    return out


def for_speed(state: PlannerState, batch: WorkerBatch, step_s: float, profile: Profile, draft: Profile | None,
              max_spec_len: int, prior: float) -> dict[str, int]:
    """The batch's speculative lengths raised where that decodes faster within its period
    (`planner.spec_choice.fastest_floor`)."""
    reqs = [state.requests[rid] for rid in batch.decode]
    context = np.fromiter((r.prompt_len + r.num_output for r in reqs), np.float64, len(reqs))
    lens = np.fromiter((batch.spec_lens.get(rid, 0) for rid in batch.decode), np.int64, len(reqs))
    classes: dict[str | None, int] = {}
    row = [classes.setdefault(r.slo_class, len(classes)) for r in reqs]
    table = np.vstack([gains_row(acceptance(state, c, prior), max_spec_len) for c in classes])
    prefill = batch_shape(state, WorkerBatch(prefill=batch.prefill)) if batch.prefill else NO_PREFILL
    k = fastest_floor(profile, prefill, context, lens, table[row], step_s, draft)
    return {rid: n for rid, n in zip(batch.decode, k.tolist()) if n}
