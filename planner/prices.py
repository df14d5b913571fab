"""What batches cost a replica, in the admission model's terms: the period a TPOT tier sets, the
prefill budget its decode work leaves, and its speculative length, for the requests running
and each number more that may join them (`Tables`); the period when no TPOT paces the batches;
how many sequences a decode step can hold within a TPOT. Pure functions of the performance
model, shared by the admission program (`planner.admission`), the SLO policy and the role
choice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.spec_choice import periods
from shared.roofline import Batches, Profile, prefill_budgets

IDLE_STEP_S = 0.05  # shortest batch period with no TPOT to pace it
IDLE_CHUNK = 512  # prefill tokens a batch with no TPOT to pace it has room for at least, as Sarathi-Serve's chunks
DEFAULT_CONTEXT = 512  # context assumed for a decoding request when nothing else says


@dataclass(frozen=True)
class Replica:
    """What is running on one replica (the decode work every batch carries) and what it may
    take on."""

    decoding: int  # requests decoding
    context_tokens: int  # their KV tokens, read by every decode step
    tightest_tpot_s: float | None
    free_blocks: int  # what the new requests' KV costs (`Job.blocks`) must fit in
    max_num_seqs: int = 256
    prefill_only: bool = False  # a prefill worker: no decode work in its batches
    max_new: int | None = None  # most requests it may admit now; None: no cap
    alpha: float = 0.0  # per-token speculative acceptance of its decoding requests
    max_spec_len: int = 0  # 0: it cannot speculate
    draft: Profile | None = None  # the draft model's cost, for a draft-model speculator
    busy_s: float = 0.0  # what the step in flight has left to run, as priced: the first batch starts after it
    decode_tpots: tuple[float, ...] = ()  # the TPOTs of the decoding requests that have one: each
    # speculates only as far as its own TPOT needs at a period, which prices the period's decode work


@dataclass(frozen=True)
class Tables:
    """The model's prices for c = 0 .. C requests joining the decoders, by tier (columns): the
    batch period, its prefill budget (-1: the decoders would miss their TPOT) and its k."""

    tiers: list[float | None]  # TPOTs, tightest first; the last is what runs now (None: nothing paces it)
    step: np.ndarray
    budget: np.ndarray
    spec_len: np.ndarray

    @property
    def first_below(self) -> int:
        """The count from which the first period changes: the states before it are still in it."""
        col = len(self.tiers) - 1
        changed = (self.step[1:, col] != self.step[0, col]) | (self.budget[1:, col] < 0)
        return int(np.argmax(changed)) + 1 if changed.any() else len(self.step)


def price_tables(profile: Profile, replica: Replica, tiers: list[float | None], count: int, context: float,
                 waiting: float = 0.0, chunk_kv: float = 0.0, alphas: list[float] | None = None) -> Tables:
    """`alphas`: the acceptance each tier is priced at (default: the replica's)."""
    joining = np.arange(count + 1)
    alphas = alphas or [replica.alpha] * len(tiers)
    columns = [batch_periods(profile, replica, tier, joining, joining * context, waiting, chunk_kv, alpha)
               for tier, alpha in zip(tiers, alphas)]
    step, budget, k = (np.ascontiguousarray(np.stack([c[i] for c in columns], axis=1)) for i in range(3))
    return Tables(tiers, step.astype(np.float64), budget, k)


def idle_step_s(profile: Profile, decoding: int, context_tokens: int) -> float:
    """The batch period when no TPOT paces the batches: long enough for `IDLE_CHUNK` prefill
    tokens beside what decodes now, so that a slow machine still batches efficiently, and no
    shorter than `IDLE_STEP_S`."""
    batch = Batches.of(prefill_tokens=IDLE_CHUNK, decode_seqs=decoding, kv_read=context_tokens,
                       num_seqs=decoding + 1, attention_pairs=context_tokens + IDLE_CHUNK**2 / 2)
    return max(IDLE_STEP_S, float(profile.predict(batch)))


def max_decode_batch(profile: Profile, context: float, tpot_s: float | None, max_num_seqs: int) -> int:
    """The most sequences of `context` tokens a plain decode step can hold and still last at
    most `tpot_s`."""
    if tpot_s is None:
        return max_num_seqs
    seqs = np.arange(1, max_num_seqs + 1)
    times = profile.predict(Batches.of(decode_seqs=seqs, kv_read=seqs * context, attention_pairs=seqs * context))
    return int((times <= tpot_s).sum())


def batch_periods(profile: Profile, replica: Replica, tpot_s: float | None, joining: np.ndarray,
                  joining_context: np.ndarray, waiting: float = 0.0, chunk_kv: float = 0.0,
                  alpha: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch period, prefill budget (-1 where the decoders would miss their TPOT) and
    speculative length at TPOT `tpot_s` (None: nothing paces the batches), with the running
    requests and each number in `joining` more (reading `joining_context` KV tokens a step)
    decoding, cut to one batch of the `waiting` prefill where that is shorter; a chunk reads
    `chunk_kv` prompt tokens before its own (`prefill_budgets`). Speculation is priced at
    acceptance `alpha` (default: the replica's)."""
    if replica.prefill_only:
        joining, joining_context = 0 * joining, 0 * joining_context
    seqs = replica.decoding + joining
    kv_read = replica.context_tokens + joining_context
    if replica.prefill_only or tpot_s is None:
        step_s = idle_step_s(profile, 0 if replica.prefill_only else replica.decoding,
                             0 if replica.prefill_only else replica.context_tokens)
        budgets = prefill_budgets(profile.model, profile.params, step_s, seqs, 1.0, kv_read, chunk_kv=chunk_kv)
        if 0 < waiting < budgets.min():  # cut to one batch of what waits, as `periods` does
            prefill = math.ceil(waiting) + 1
            whole = profile.predict(Batches.of(prefill_tokens=prefill, decode_seqs=seqs, num_seqs=seqs + 1,
                                               kv_read=kv_read + prefill + chunk_kv, attention_pairs=kv_read))
            cut = max(IDLE_STEP_S, float(whole.max()))
            shorter = prefill_budgets(profile.model, profile.params, cut, seqs, 1.0, kv_read, chunk_kv=chunk_kv)
            if cut < step_s and (shorter >= waiting).all():
                step_s, budgets = cut, shorter
        return np.full(len(seqs), step_s), budgets, np.zeros(len(seqs), dtype=np.int64)
    ks, steps, budgets = periods(profile, tpot_s, seqs, np.rint(kv_read / np.maximum(1, seqs)),
                                 replica.alpha if alpha is None else alpha,
                                 replica.draft, replica.max_spec_len, keep_first=True,
                                 looser=np.array(replica.decode_tpots), waiting=waiting, chunk_kv=chunk_kv)
    return steps, budgets, ks * (budgets >= 0)
