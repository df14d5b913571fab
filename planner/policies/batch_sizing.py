"""How much of the plan's prefill the next batch runs: cut to the period and to what runs
efficiently, and without a tight prompt's last token where decoding it early would cost the
prompts behind it their deadlines. Pure functions of the state and the plan, for the SLO policy."""

from __future__ import annotations

import numpy as np

from planner.admission import Plan
from planner.costs import batch_seconds
from planner.decisions import WorkerBatch
from planner.state import PlannerState
from shared.roofline import Profile

EFFICIENCY = 0.9  # a batch prefills at least at this share of the best prefill rate its period allows
HOLD_BATCHES = 2  # a prompt's last token waits for its TTFT to be this many batches away (`hold_back`)


def size_prefill(profile: Profile, state: PlannerState, batch: WorkerBatch, step_s: float, needed: int,
                 behind: bool = False) -> list[tuple[str, int]]:
    """How much of the planned prefill the next batch runs, cut from the end of its chunks.

    Never so much that the batch outlasts its period (the budget was priced without the
    chunks' own attention over their earlier context), and no more than the deadlines
    need, or than it takes to prefill at EFFICIENCY of the best rate the period allows: a
    longer batch adds little prefill per second but slows every decoding request, which
    then holds its KV blocks longer; beside a promised request `behind` its TPOT, no more
    than the deadlines need. A cut inside a prompt moves to its end when that fits, rather
    than leave a stub for the next batch."""
    ends = np.cumsum([n for _, n in batch.prefill], dtype=np.float64)
    totals = np.unique(np.concatenate([np.linspace(0, ends[-1], 33).round(), ends]))
    seconds = batch_seconds(profile, state, batch, totals)
    fits = seconds <= step_s
    if not fits.any():
        return []
    rates = totals / seconds
    efficient = totals[fits & (rates >= EFFICIENCY * rates[fits].max())]
    most = totals[fits][-1]
    keep = min(most, needed if behind else max(efficient[0], needed))
    finish = ends[np.searchsorted(ends, keep)] if keep < ends[-1] else ends[-1]
    if finish <= most:  # finish the prompt it cuts into, rather than leave a stub for the next batch
        keep = finish
    out = []
    for (rid, n), end in zip(batch.prefill, ends.tolist()):
        n = int(min(n, keep - (end - n)))
        if n <= 0:
            break
        out.append((rid, n))
    return out


def hold_back(state: PlannerState, prefill: list[tuple[str, int]], p: Plan, now: float) -> list[tuple[str, int]]:
    """The batch's chunks, less the last prompt token of each request that would start decoding
    at a TPOT tighter than the batches run now while other admitted prompts still wait, unless
    its TTFT is due within HOLD_BATCHES batches. The plan counts a request's decoding from its
    TTFT deadline on; one that starts early shortens every batch sooner than planned, and a
    promised prompt behind it can miss its TTFT."""
    if sum(p.admitted_tokens) <= prefill_tokens(prefill):  # nothing else waits
        return prefill
    out = []
    for rid, n in prefill:
        req = state.requests[rid]
        tpot = req.tpot_s
        if (n >= req.prefill_left and tpot is not None and tpot < p.step_s
                and req.deadline - now > HOLD_BATCHES * p.step_s):
            n -= 1
        if n > 0:
            out.append((rid, n))
    return out


def prefill_tokens(chunks: list[tuple[str, int]]) -> int:
    """Prompt tokens in a batch's chunks."""
    return sum(n for _, n in chunks)
