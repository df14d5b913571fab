"""Paged KV cache: one tensor of fixed-size blocks and an allocator with reference counts.

Layout is block-major, [num_blocks, layers, 2 (K, V), block_size, kv_heads, head_dim], so one
block of one request is one contiguous region: a KV handover moves whole blocks.
"""

from __future__ import annotations

from collections import deque

import torch

from engine.config import ModelConfig


class OutOfKVBlocks(RuntimeError):
    """Not enough free blocks; nothing was allocated."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfKVBlocks(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Another owner holds these blocks too (prefix sharing, speculative forks)."""
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.block_size = block_size
        self.data = torch.zeros(
            num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim,
            device=device, dtype=dtype,
        )
        self.layers = [(self.data[:, i, 0], self.data[:, i, 1]) for i in range(cfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def num_blocks_for(cfg: ModelConfig, block_size: int, megabytes: int, dtype: torch.dtype) -> int:
        per_block = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
        return max(1, megabytes * 2**20 // per_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
