"""SLO-adaptive speculation: the speculative length for a tier of decode SLOs.

A decode step with speculative length k runs the draft k times and verifies k + 1 tokens per
sequence. If each proposed token is accepted with probability α (stopping at the first
rejection), a sequence gains E(k) = (1 - α^(k+1)) / (1 - α) tokens per step on average. The
gains are draws, so a promise does not count on their mean: a step may last τ·G(k), where G(k)
is what the mean over `PROMISE_STEPS` steps reaches 19 times in 20 (`promised_gains_row`), and
still keep a TPOT of τ. Whatever of that time the decode work leaves is prefill budget; the
chosen k is the one that leaves the most prefill tokens per second, among those that meet τ at
all. Pure functions of the performance model, for the planner and the benches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from shared.messages import MAX_SPEC_LEN
from shared.roofline import Batches, Profile, prefill_budgets

_ZERO = np.zeros(())  # no prefill in a decode step
PROMISE_STEPS = 16.0  # steps over which a TPOT promise counts on speculation's draws evening out
PROMISE_Z = 1.645  # how far below their mean it counts on: their 5th percentile, as a normal


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a sequence gains per step: accepted proposals plus the target's own token."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass(frozen=True)
class SpecChoice:
    k: int
    step_s: float  # how long a step may last and keep the TPOT
    decode_s: float  # the decode work in it, draft included
    prefill_tokens_per_s: float  # prefill that still fits, per second


def spread_tokens(alpha: float, k: int) -> float:
    """The standard deviation of the tokens a step gains: 1 + j with probability α^j (1 - α)
    for j < k accepted, k + 1 with α^k."""
    p = np.array([alpha ** j * (1 - alpha) for j in range(k)] + [alpha ** k])
    gained = np.arange(1, k + 2, dtype=np.float64)
    return math.sqrt(max(0.0, float(p @ gained**2) - float(p @ gained) ** 2))


@functools.lru_cache(maxsize=1024)
def promised_gains_row(alpha: float, max_k: int) -> np.ndarray:
    """The tokens a step gains that a TPOT promise counts on, for k = 0 .. max_k: their mean
    over PROMISE_STEPS steps at its lower PROMISE_Z deviation (a normal approximation), never
    below the target's own token. The draws are random: priced at their mean, a request decoded
    at whole periods runs behind its TPOT half the time, and a short output has too few steps
    to make it up."""
    gain = [max(1.0, expected_tokens(alpha, k) - PROMISE_Z * spread_tokens(alpha, k) / math.sqrt(PROMISE_STEPS))
            for k in range(max_k + 1)]
    row = np.array([gain])
    row.flags.writeable = False
    return row


@functools.lru_cache(maxsize=1024)
def gains_row(alpha: float, max_k: int) -> np.ndarray:
    """E(k) for k = 0 .. max_k, as a row (cached: the planner asks for the same few α all the time)."""
    gain = np.array([[expected_tokens(alpha, k) for k in range(max_k + 1)]])
    gain.flags.writeable = False
    return gain


@functools.lru_cache(maxsize=64)
def _ks(max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """k = 0 .. max_k and the tokens each verifies, k + 1, as float rows."""
    ks = np.arange(max_k + 1, dtype=np.float64)[None, :]
    verify_len = ks + 1
    ks.flags.writeable = verify_len.flags.writeable = False
    return ks, verify_len


def _grid(target: Profile, tpot_s: float, batch: np.ndarray, context: np.ndarray, alpha: float,
          draft: Profile | None, max_k: int, looser: np.ndarray | None = None, shorter_s: float = 0.0,
          waiting: float = 0.0, chunk_kv: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                               np.ndarray | None]:
    """Every (batch, context) pair by every k: the step length (a row: it depends on k alone),
    its decode work, whether that keeps the TPOT, and the prefill budget left. `looser`: the
    TPOTs of decoders among the batch that need not keep `tpot_s`; each verifies only the
    fewest tokens that keep its own at the step's length, as the planner orders them.
    `shorter_s`: every step that much shorter than its TPOT allows. With `waiting` budget
    tokens to prefill, also how long a step that prefills them all (and one more, for the
    budgets' rounding down) beside the decode work takes. `chunk_kv`: prompt tokens a chunk
    reads before its own (`prefill_budgets`)."""
    batch = np.asarray(batch, dtype=np.float64)[:, None]
    context = np.asarray(context, dtype=np.float64)[:, None]
    ks, verify_len = _ks(max_k)
    gains = promised_gains_row(alpha, max_k)
    steps = tpot_s * gains - shorter_s
    verified = batch * verify_len
    if looser is not None and len(looser):
        need = steps / np.asarray(looser, dtype=np.float64)[:, None]  # tokens a step each must gain
        own = np.minimum(np.searchsorted(gains[0], need * (1 - 1e-9)), ks)
        verified = verified - (ks - own).sum(axis=0)
        verify_len = verified / np.maximum(batch, 1.0)
    kv_read = batch * context + verified
    decode_s = target.predict(Batches(_ZERO, batch, verify_len, kv_read, batch, verified * context))
    draft_s = 0.0
    if draft:
        draft_s = ks * draft.predict(Batches.of(decode_seqs=batch, kv_read=batch * context,
                                                attention_pairs=batch * context))
    decode_s, step_left = decode_s + draft_s, steps - draft_s
    ok = (decode_s <= steps) & ((ks == 0) | (batch > 0))
    budget = prefill_budgets(target.model, target.params, step_left, batch, verify_len, kv_read, verified * context,
                             chunk_kv)
    whole_s = None
    if waiting > 0:
        prefill = np.float64(math.ceil(waiting) + 1)
        whole_s = draft_s + target.predict(Batches(prefill, batch, verify_len, kv_read + prefill + chunk_kv,
                                                   batch + 1, verified * context))
    return steps, decode_s, ok, budget, whole_s


def periods(target: Profile, tpot_s: float, batch: np.ndarray, context: np.ndarray, alpha: float,
            draft: Profile | None = None, max_k: int = MAX_SPEC_LEN, keep_first: bool = False,
            looser: np.ndarray | None = None, waiting: float = 0.0,
            chunk_kv: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each (batch, context) pair, the best k, its step length and its prefill budget;
    budget -1 where no k keeps the TPOT. With nothing decoding there is nothing to
    speculate: k = 0. `keep_first`: every pair keeps the first pair's k while that k keeps
    the TPOT, so that the period stays the same as the batch grows. `looser`: see `_grid`.
    `waiting`: prefill budget tokens waiting to run; where every pair's budget holds them with
    room to spare, the steps are cut alike to the longest step that prefills them all, at the
    same k: the engine runs batches back to back, so one with little prefill ends early, and a
    loose TPOT's long period would otherwise be priced as if it ran whole. `chunk_kv`: see
    `_grid`."""
    steps, _, ok, budget, whole_s = _grid(target, tpot_s, batch, context, alpha, draft, max_k, looser,
                                          waiting=waiting, chunk_kv=chunk_kv)
    rate = budget / steps
    rate[~ok] = -1.0
    best = rate.argmax(axis=1)  # the first, so the smallest k, among equals
    if keep_first and len(best):
        best = np.where(ok[:, best[0]], best[0], best)
    rows = np.arange(len(best))
    chosen = budget[rows, best]
    chosen[~ok[rows, best]] = -1
    step = steps[0, best]
    feasible = chosen >= 0
    if waiting > 0 and feasible.any() and chosen[feasible].min() > waiting:  # else no step can be cut
        cut = float((step - whole_s[rows, best])[feasible].min())
        if cut > 0:
            steps, _, ok, budget, _ = _grid(target, tpot_s, batch, context, alpha, draft, max_k, looser, cut,
                                            chunk_kv=chunk_kv)
            shorter = budget[rows, best]
            if (ok[rows, best] & (shorter >= waiting))[feasible].all():
                step, chosen = steps[0, best], np.where(feasible, shorter, -1)
    return best, step, chosen


def options(target: Profile, tpot_s: float, batch: int, context: int, alpha: float,
            draft: Profile | None = None, max_k: int = MAX_SPEC_LEN) -> list[SpecChoice]:
    """Every k that keeps the TPOT, with what it leaves for prefill."""
    steps, decode_s, ok, budget, _ = _grid(target, tpot_s, np.array([batch]), np.array([context]), alpha, draft, max_k)
    return [SpecChoice(k, float(steps[0, k]), float(decode_s[0, k]), float(budget[0, k] / steps[0, k]))
            for k in np.flatnonzero(ok[0]).tolist()]


def choose_spec_len(target: Profile, tpot_s: float, batch: int, context: int, alpha: float,
                    draft: Profile | None = None, max_k: int = MAX_SPEC_LEN) -> SpecChoice | None:
    """The k that leaves the most prefill throughput while keeping the TPOT; None if no k
    keeps it."""
    return max(options(target, tpot_s, batch, context, alpha, draft, max_k),
               key=lambda c: (c.prefill_tokens_per_s, -c.k), default=None)


def fastest_token_s(target: Profile, context: np.ndarray, alpha: float, draft: Profile | None = None,
                    max_k: int = MAX_SPEC_LEN) -> np.ndarray:
    """For each context, the least time a token can take: a sequence decoding alone, at the
    speculative length that yields tokens fastest. A TPOT below it is one no batch can keep."""
    context = np.asarray(context, dtype=np.float64)[:, None]
    ks, verify_len = _ks(max_k)
    seconds = target.predict(Batches.of(decode_seqs=1.0, verify_len=verify_len, kv_read=context + verify_len,
                                        num_seqs=1.0, attention_pairs=verify_len * context))
    if draft is not None:
        seconds = seconds + ks * draft.predict(Batches.of(decode_seqs=1.0, kv_read=context, attention_pairs=context))
    return (seconds / promised_gains_row(alpha, max_k)).min(axis=1)


def fastest_floor(target: Profile, prefill: Batches, context: np.ndarray, spec_lens: np.ndarray, gains: np.ndarray,
                  step_s: float, draft: Profile | None = None) -> np.ndarray:
    """The decoding requests' speculative lengths raised alike to the floor that decodes the
    most tokens per second, among floors that keep the step within `step_s` (or no longer
    than it is now). In a step bound by reading the weights and the KV cache a few more
    verified tokens cost little, and requests that finish sooner free their KV blocks and
    batch slots for the next ones: where memory, not the TPOT, limits the load, that is
    capacity.

    `prefill`: the step's prefill chunks alone (one shape); `context`, `spec_lens`: each
    decoding request's KV tokens and speculative length; `gains[i, k]`: tokens request i gains
    per step at length k."""
    max_k = gains.shape[1] - 1
    lens = np.maximum(spec_lens[:, None], np.arange(max_k + 1)[None, :])  # request by floor
    seqs, kv = float(len(context)), float(context.sum())
    verify = lens.sum(axis=0) + seqs
    seconds = target.predict(Batches(prefill.prefill_tokens, np.float64(seqs), verify / seqs, prefill.kv_read + kv,
                                     prefill.num_seqs + seqs, prefill.attention_pairs + context @ lens + kv))
    if draft is not None:
        draft_step = draft.predict(Batches.of(decode_seqs=seqs, kv_read=kv, attention_pairs=kv))
        seconds = seconds + lens.max(axis=0) * draft_step
    tokens = np.take_along_axis(gains, lens, axis=1).sum(axis=0)
    rate = np.where(seconds <= max(step_s, float(seconds[0])), tokens / seconds, -1.0)
    return lens[:, int(rate.argmax())]
