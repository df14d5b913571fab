"""Proposers for speculative decoding: cheap guesses of a request's next k tokens, which the
target model then verifies in one forward pass (`engine.sampling.verify`).

Two kinds: n-gram prompt lookup (no model; strong where the output repeats its input, as in
code editing and summarisation) and a small draft model with a paged KV cache of its own.
A proposer may return fewer tokens than asked, or none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from engine.config import UnsupportedModel
from engine.kv_cache import OutOfKVBlocks
from engine.model_runner import ModelRunner, Work
from engine.sampling import probabilities
from engine.sequence import Sequence

log = logging.getLogger(__name__)

Speculator = Literal["none", "ngram", "draft"]


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), vocab] the draws' distributions; None: deterministic


class Proposer(Protocol):
    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[str, Proposal]:
        """Up to k tokens for each (sequence, k), by request id."""
        ...

    def rollback(self, seq: Sequence) -> None:
        """Forget what lies past the tokens the target kept (`seq.num_computed`)."""
        ...

    def release(self, request_id: str) -> None: ...


def lookup(tokens: list[int], k: int, max_n: int) -> list[int]:
    """The (up to) k tokens that followed the latest earlier occurrence of the longest suffix
    n-gram, n ≤ max_n."""
    arr = np.asarray(tokens)
    length = len(arr)
    for n in range(min(max_n, length - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


@dataclass
class NgramProposer:
    max_n: int = 3

    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[str, Proposal]:
        out = {}
        for seq, k in wants:
            tokens = lookup(seq.token_ids, k, self.max_n)
            if tokens:
                out[seq.request_id] = Proposal(tokens, None)
        return out

    def rollback(self, seq: Sequence) -> None:
        """Nothing to forget: lookups read the sequence afresh."""

    def release(self, request_id: str) -> None:
        """Nothing held."""


@dataclass
class _DraftState:
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens of the sequence whose draft KV is in `blocks`


class DraftProposer:
    """A small model of the same vocabulary, run autoregressively k steps, batched across
    requests. Its KV cache catches up lazily: the first proposal for a request prefills the
    draft on everything so far."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, num_blocks: int,
                 block_size: int, vocab_size: int) -> None:
        self.runner = ModelRunner(model_dir, device, dtype, num_blocks, block_size)
        if self.runner.cfg.vocab_size != vocab_size:
            raise UnsupportedModel(f"draft model {model_dir} has vocabulary {self.runner.cfg.vocab_size}, "
                                   f"the target {vocab_size}")
        self.states: dict[str, _DraftState] = {}

    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[str, Proposal]:
        kv = self.runner.kv
        active: list[tuple[Sequence, int, _DraftState]] = []
        for seq, k in wants:
            st = self.states.setdefault(seq.request_id, _DraftState())
            missing = kv.blocks_needed(len(seq.token_ids) + k - 1) - len(st.blocks)
            try:
                st.blocks += kv.allocator.allocate(max(0, missing))
            except OutOfKVBlocks as exc:
                log.warning("request %s: no draft proposal (%s)", seq.request_id, exc)
                continue
            active.append((seq, k, st))
        pending = {seq.request_id: seq.token_ids[st.computed:] for seq, _, st in active}
        drawn: dict[str, list[int]] = {seq.request_id: [] for seq, _, _ in active}
        dists: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq, _, _ in active}
        for j in range(max((k for _, k, _ in active), default=0)):
            batch = [(seq, st) for seq, k, st in active if k > j]
            logits = self.runner.forward([Work(pending[s.request_id], st.computed, st.blocks, 1)
                                          for s, st in batch])
            for row, (seq, st) in zip(logits, batch):
                rid = seq.request_id
                if seq.params.greedy:
                    token = int(row.argmax())
                else:
                    q = probabilities(row, seq.params)
                    token = int(torch.multinomial(q, 1, generator=seq.generator).item())
                    dists[rid].append(q)
                st.computed += len(pending[rid])
                pending[rid] = [token]
                drawn[rid].append(token)
        return {rid: Proposal(tokens, torch.stack(dists[rid]) if dists[rid] else None)
                for rid, tokens in drawn.items()}

    def rollback(self, seq: Sequence) -> None:
        st = self.states.get(seq.request_id)
        if st is None:
            return
        st.computed = min(st.computed, seq.num_computed)
        keep = self.runner.kv.blocks_needed(st.computed)
        self.runner.kv.allocator.free(st.blocks[keep:])
        del st.blocks[keep:]

    def release(self, request_id: str) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            self.runner.kv.allocator.free(st.blocks)


def make_proposer(kind: Speculator, draft_dir: Path | None, runner: ModelRunner) -> Proposer | None:
    """The proposer for a target model; the draft gets as many KV blocks as the target, so it
    never runs out before the target does."""
    if kind == "none":
        return None
    if kind == "ngram":
        return NgramProposer()
    if draft_dir is None:
        raise ValueError("the draft speculator needs a draft model directory")
    return DraftProposer(draft_dir, runner.device, runner.dtype, runner.kv.allocator.num_blocks,
                         runner.kv.block_size, runner.cfg.vocab_size)
