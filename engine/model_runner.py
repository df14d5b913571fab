"""A model with its paged KV cache: runs one flat, mixed batch per forward pass.

The target model and the draft model each have one. The caller says, per sequence, which
tokens to run at which positions, which KV blocks hold the sequence, and for how many trailing
tokens it wants logits; block bookkeeping (who owns which block) stays with the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model import AttentionLayout, PrefillSpan, ShortGroup

SHORT_QUERY_MAX = 16  # sequences with at most this many new tokens are attended in groups
PADDING_MAX = 0.1  # a group's padded key blocks may exceed its real ones by this fraction
CPU_GROUP_BLOCKS = 256  # on CPU a group gathers at most this many blocks: a gather that stays in cache is faster

Short = tuple[int, int, int, list[int]]  # a short sequence: (flat start, context, new tokens, block table)


@dataclass
class Work:
    """One sequence's share of a forward pass."""

    tokens: list[int]  # run at positions start, start + 1, ...
    start: int
    blocks: list[int]  # the sequence's block table, covering start + len(tokens) positions
    num_logits: int  # logits wanted for this many trailing tokens


class ModelRunner:
    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, num_blocks: int,
                 block_size: int) -> None:
        self.device = device
        self.dtype = dtype
        self.cfg = ModelConfig.from_dir(model_dir)
        self.model = load_model(model_dir, device, dtype)
        self.kv = KVCache(self.cfg, num_blocks, block_size, device, dtype)
        self._gather = torch.empty(0, device=device, dtype=dtype)

    def forward(self, work: list[Work]) -> torch.Tensor:
        """Float logits [sum of num_logits, vocab], in the order of `work`."""
        bs, dev = self.kv.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        short: list[Short] = []
        prefills: list[PrefillSpan] = []
        logits_idx: list[int] = []
        for w in work:
            start, c, n = len(ids), w.start, len(w.tokens)
            ids += w.tokens
            positions += range(c, c + n)
            slot_blocks += (w.blocks[p // bs] for p in range(c, c + n))
            blocks = w.blocks[: self.kv.blocks_needed(c + n)]
            if n <= SHORT_QUERY_MAX:
                short.append((start, c, n, blocks))
            else:
                prefills.append(PrefillSpan(start, start + n, c + n, torch.tensor(blocks, device=dev)))
            logits_idx += range(start + n - w.num_logits, start + n)
        pos = torch.tensor(positions, device=dev)
        groups = similar_lengths(short, CPU_GROUP_BLOCKS if self.device == "cpu" else math.inf)
        gather = self._workspace(max((len(g) * len(g[0][3]) for g in groups), default=0))
        layout = AttentionLayout(
            slot_blocks=torch.tensor(slot_blocks, device=dev),
            slot_offsets=pos % bs,
            shorts=[self._short_group(g, gather) for g in groups],
            prefills=prefills,
        )
        return self.model(torch.tensor(ids, device=dev), pos, layout, self.kv.layers,
                          torch.tensor(logits_idx, device=dev, dtype=torch.long))

    def _short_group(self, short: list[Short], gather: torch.Tensor) -> ShortGroup:
        """Padded index, table and causal-mask tensors of one group, built once per step and
        shared by every layer."""
        dev = self.device
        width = len(short[0][3])
        q_max = max(n for _, _, n, _ in short)
        offsets = torch.arange(q_max, device=dev)
        starts = torch.tensor([s for s, *_ in short], device=dev, dtype=torch.long)
        contexts = torch.tensor([c for _, c, _, _ in short], device=dev, dtype=torch.long)
        counts = torch.tensor([n for _, _, n, _ in short], device=dev, dtype=torch.long)
        clamped = torch.minimum(offsets[None, :], (counts - 1)[:, None])
        last_key = contexts[:, None] + clamped  # each query sees keys up to its own position
        keys = torch.arange(width * self.kv.block_size, device=dev)
        rows = [s + j for s, _, n, _ in short for j in range(n)]  # on the host: a mask would sync
        picks = [i * q_max + j for i, (_, _, n, _) in enumerate(short) for j in range(n)]
        return ShortGroup(
            idx=starts[:, None] + clamped,
            rows=torch.tensor(rows, device=dev),
            picks=torch.tensor(picks, device=dev),
            tables=torch.tensor([b + [0] * (width - len(b)) for _, _, _, b in short],
                                device=dev, dtype=torch.long).view(len(short), width),
            mask=(keys[None, None, :] <= last_key[:, :, None])[:, None],
            gather=gather[:, : len(short) * width],
        )

    def _workspace(self, num_blocks: int) -> torch.Tensor:
        """Room to gather K and V of `num_blocks` blocks. It is kept and grown, never freed:
        large tensors allocated afresh every layer cost page faults on every step."""
        if self._gather.numel() == 0 or self._gather.shape[1] < num_blocks:
            size = max(num_blocks, 2 * (self._gather.shape[1] if self._gather.numel() else 0))
            self._gather = torch.empty(2, size, *self.kv.data.shape[3:], device=self.device,
                                       dtype=self.dtype)
        return self._gather[:, :num_blocks]


def similar_lengths(short: list[Short], most: float = math.inf) -> list[list[Short]]:
    """Short sequences split into groups, longest first, each padded at most PADDING_MAX past
    its real blocks and gathering at most `most` blocks: one call for all would read every
    sequence up to the longest one's length, which for a batch of mixed contexts doubles the
    attention's work."""
    groups: list[list[Short]] = []
    real = 0
    for item in sorted(short, key=lambda s: len(s[3]), reverse=True):
        blocks = len(item[3])
        padded = (len(groups[-1]) + 1) * len(groups[-1][0][3]) if groups else 0
        if groups and padded <= min(most, (1 + PADDING_MAX) * (real + blocks)):
            groups[-1].append(item)
            real += blocks
        else:
            groups.append([item])
            real = blocks
    return groups
