"""What a batch costs, by the performance model: the planner's view of a step's shape (the
contexts its decoding requests read, the context each prefill chunk attends to) priced by a
profile. The policies size batches with it and the state machine checks it against the time steps
really take."""

from __future__ import annotations

import numpy as np

from planner.decisions import WorkerBatch
from planner.state import PlannerState
from shared.roofline import Batches, Profile


def batch_seconds(profile: Profile, state: PlannerState, batch: WorkerBatch,
                  prefill_totals: np.ndarray | None = None) -> np.ndarray:
    """Predicted seconds of the batch's decode work plus the first t of its prefill tokens (in
    chunk order), for each t in `prefill_totals`; by default, of the whole batch."""
    return profile.predict(batch_shape(state, batch, prefill_totals))


def batch_shape(state: PlannerState, batch: WorkerBatch, prefill_totals: np.ndarray | None = None) -> Batches:
    """The batch as the performance model sees it (see `batch_seconds`)."""
    verify = context = pairs = 0
    for rid in batch.decode:  # one pass: the state machine prices every order it sends
        req = state.requests[rid]
        v, c = 1 + batch.spec_lens.get(rid, 0), req.prompt_len + req.num_output
        verify, context, pairs = verify + v, context + c, pairs + v * c
    seqs = len(batch.decode)
    if batch.prefill or prefill_totals is not None:
        start = np.array([state.requests[rid].num_computed for rid, _ in batch.prefill], dtype=np.float64)
        size = np.array([n for _, n in batch.prefill], dtype=np.float64)
        ends = np.cumsum(size)
        totals = np.array([ends[-1] if len(ends) else 0.0]) if prefill_totals is None else prefill_totals
        taken = np.clip(totals[:, None] - (ends - size)[None, :], 0, size[None, :])
        prefill_kv, prefill_seqs = (start[None, :] + taken).sum(axis=1), (taken > 0).sum(axis=1)
        prefill_pairs = (taken * (start[None, :] + taken / 2)).sum(axis=1)
    else:  # decode alone, most orders: no arrays to build
        totals, prefill_kv, prefill_seqs, prefill_pairs = np.zeros(1), 0.0, np.zeros(1, dtype=np.int64), 0.0
    return Batches.of(prefill_tokens=totals, decode_seqs=seqs, verify_len=verify / max(1, seqs),
                      kv_read=context + prefill_kv, num_seqs=seqs + prefill_seqs, attention_pairs=pairs + prefill_pairs)
