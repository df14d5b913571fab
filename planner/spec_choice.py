"""SLO-adaptive speculation: the speculative length for a tier of decode SLOs.

A decode step with speculative length k runs the draft k times and verifies k + 1 tokens per
sequence. If each proposed token is accepted with probability α (stopping at the first
rejection), a sequence gains E(k) = (1 - α^(k+1)) / (1 - α) tokens per step, so a step may last
τ·E(k) and still keep a TPOT of τ. Whatever of that time the decode work leaves is prefill
budget; the chosen k is the one that leaves the most prefill tokens per second, among those
that meet τ at all. Pure functions of the performance model, for the planner and the benches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.messages import MAX_SPEC_LEN
from shared.roofline import Batches, Profile, prefill_budget


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a sequence gains per step: accepted proposals plus the target's own token."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def acceptance_from_rate(rate: float, k: int) -> float:
    """The per-token α at which a share `rate` of k proposals is accepted on average (what
    workers report, accepted / proposed), by bisection."""
    if k <= 0 or rate <= 0:
        return 0.0
    if rate >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if (expected_tokens(mid, k) - 1) / k < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class SpecChoice:
    k: int
    step_s: float  # how long a step may last and keep the TPOT
    decode_s: float  # the decode work in it, draft included
    prefill_tokens_per_s: float  # prefill that still fits, per second


def options(target: Profile, tpot_s: float, batch: int, context: int, alpha: float,
            draft: Profile | None = None, max_k: int = MAX_SPEC_LEN) -> list[SpecChoice]:
    """Every k that keeps the TPOT, with what it leaves for prefill. With nothing decoding
    there is nothing to speculate: k = 0 only."""
    if not batch or not max_k:
        kv_read = batch * (context + 1)
        plain = float(target.predict(Batches.of(decode_seqs=batch, kv_read=kv_read, attention_pairs=batch * context)))
        if batch and plain > tpot_s:
            return []
        budget = prefill_budget(target.model, target.params, tpot_s, batch, 1, kv_read)
        return [SpecChoice(0, tpot_s, plain if batch else 0.0, budget / tpot_s)]
    ks = np.arange(max_k + 1)
    gain = ks + 1.0 if alpha >= 1 else (1 - alpha ** (ks + 1)) / (1 - alpha)
    steps = tpot_s * gain
    kv_read = batch * (context + ks + 1)
    verify = target.predict(Batches.of(decode_seqs=batch, verify_len=ks + 1, kv_read=kv_read,
                                       attention_pairs=batch * (ks + 1) * context))
    draft_s = ks * float(draft.predict(Batches.of(decode_seqs=batch, kv_read=batch * context,
                                                  attention_pairs=batch * context))) if draft else 0.0 * ks
    out = []
    for k in np.flatnonzero(verify + draft_s <= steps).tolist():
        step_s = float(steps[k])
        budget = prefill_budget(target.model, target.params, step_s - float(draft_s[k]), batch, k + 1,
                                float(kv_read[k]))
        out.append(SpecChoice(k, step_s, float(verify[k] + draft_s[k]), budget / step_s))
    return out


def choose_spec_len(target: Profile, tpot_s: float, batch: int, context: int, alpha: float,
                    draft: Profile | None = None, max_k: int = MAX_SPEC_LEN) -> SpecChoice | None:
    """The k that leaves the most prefill throughput while keeping the TPOT; None if no k
    keeps it."""
    return max(options(target, tpot_s, batch, context, alpha, draft, max_k),
               key=lambda c: (c.prefill_tokens_per_s, -c.k), default=None)
