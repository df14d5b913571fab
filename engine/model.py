"""A Llama-family decoder in plain torch that runs one mixed batch per forward pass.

The batch is flat: every scheduled token of every request, prefill chunks and decode tokens
alike, in one [T] tensor. Attention reads keys and values from the paged KV cache. Sequences
with few new tokens (decode steps, speculative verification, small chunks) are attended in one
padded call; long prefill chunks get one call each.
Parameter names match Hugging Face checkpoints, except that the loader concatenates q/k/v and
gate/up so that each runs as one matrix product: fewer kernel launches per layer, which is
what a decode step on a GPU is bound by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig


@dataclass
class PrefillSpan:
    """A prefill chunk: flat tokens [start, end) of a request whose context then spans
    `context_len` tokens (cached ones included), stored in the blocks of `block_table`."""

    start: int
    end: int
    context_len: int
    block_table: torch.Tensor


@dataclass
class ShortGroup:
    """Short sequences (decode steps, verifications) of similar length, attended in one call:
    each is padded to the group's longest block table."""

    idx: torch.Tensor  # [B, Q] flat index of each sequence's tokens, padded
    rows: torch.Tensor  # [N] flat index of each real (not padding) token of the group
    picks: torch.Tensor  # [N] where each of those sits among the group's B * Q outputs
    tables: torch.Tensor  # [B, max_blocks] block tables, padded
    mask: torch.Tensor  # [B, 1, Q, max_blocks * block_size] which keys each query sees
    gather: torch.Tensor  # [2, B * max_blocks, block_size, kv_heads, head_dim] workspace shared by the groups


@dataclass
class AttentionLayout:
    """Where each token's K/V goes and which cached tokens each query reads."""

    slot_blocks: torch.Tensor  # [T] block of each new token
    slot_offsets: torch.Tensor  # [T] offset inside that block
    shorts: list[ShortGroup]
    prefills: list[PrefillSpan]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_v = [q_size + kv_size, kv_size]  # the fused output split into queries and keys, values
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        layout: AttentionLayout,
    ) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split(self.qk_v, dim=-1)
        qk = qk.reshape(t, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = qk * cos + rotate_half(qk) * sin  # queries and keys rotated together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        k_cache[layout.slot_blocks, layout.slot_offsets] = k
        v_cache[layout.slot_blocks, layout.slot_offsets] = v

        out = torch.empty_like(q)
        for group in layout.shorts:
            out[group.rows] = self._short(q, k_cache, v_cache, group).flatten(0, 1)[group.picks]
        for span in layout.prefills:
            out[span.start : span.end] = self._prefill(q, k, v, k_cache, v_cache, span)
        return self.o_proj(out.view(t, -1))

    def _short(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: ShortGroup
    ) -> torch.Tensor:
        """Attention of one group of short sequences; returns [B, Q, heads, head_dim]."""
        b = group.idx.shape[0]
        flat = group.tables.view(-1)
        keys = torch.index_select(k_cache, 0, flat, out=group.gather[0])
        values = torch.index_select(v_cache, 0, flat, out=group.gather[1])
        keys = keys.view(b, -1, self.num_kv_heads, self.head_dim)
        values = values.view(b, -1, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(
            q[group.idx].transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=group.mask,
            enable_gqa=True,
        )
        return o.transpose(1, 2)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        span: PrefillSpan,
    ) -> torch.Tensor:
        n = span.end - span.start
        queries = q[span.start : span.end].transpose(0, 1)[None]
        if span.context_len == n:
            keys = k[span.start : span.end]
            values = v[span.start : span.end]
            mask = None
        else:
            keys = k_cache[span.block_table].flatten(0, 1)[: span.context_len]
            values = v_cache[span.block_table].flatten(0, 1)[: span.context_len]
            rows = torch.arange(n, device=q.device)[:, None] + (span.context_len - n)
            mask = torch.arange(span.context_len, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(
            queries,
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: AttentionLayout,
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
        logits_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Logits for the tokens at `logits_idx` of the flat batch."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, k_cache, v_cache, layout)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.model.norm(h[logits_idx])).float()
