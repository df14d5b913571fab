"""The engine: runs batch orders (mixed prefill chunks and decode tokens) on the model.

It holds each request's tokens, KV blocks, sampler and detokenizer, but makes no policy: what
runs in a step is decided by whoever writes the `BatchOrder`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.detokenizer import Detokenizer
from engine.kv_cache import KVCache, OutOfKVBlocks
from engine.loader import load_model, load_tokenizer
from engine.model import AttentionLayout, PrefillSpan
from engine.sampling import make_generator, sample
from shared.messages import BatchOrder, FinishReason, SamplingParams
from shared.model_info import context_window

log = logging.getLogger(__name__)

SHORT_QUERY_MAX = 16  # sequences with at most this many new tokens share one attention call


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: Detokenizer
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_computed_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    out_of_blocks: list[str]
    duration_s: float


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


class Engine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        kv_cache_mb: int = 256,
        num_kv_blocks: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype or default_dtype(device)
        self.cfg = ModelConfig.from_dir(model_dir)
        self.model = load_model(model_dir, device, self.dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_model_len = context_window(model_dir, max_model_len)
        num_blocks = num_kv_blocks or KVCache.num_blocks_for(self.cfg, block_size, kv_cache_mb, self.dtype)
        self.kv = KVCache(self.cfg, num_blocks, block_size, device, self.dtype)
        self.eos_token_ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self._gather = torch.empty(0, device=device, dtype=self.dtype)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.allocator.num_free

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} already exists")
        if not 0 < len(prompt_token_ids) < self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens; must be 1..{self.max_model_len - 1}"
            )
        self.seqs[request_id] = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            num_prompt=len(prompt_token_ids),
            params=params,
            generator=make_generator(params, self.device),
            detokenizer=Detokenizer(self.tokenizer, list(params.stop)),
        )

    def assume_computed(self, request_id: str, num_tokens: int) -> None:
        """For profiling: mark the first tokens as computed without running them. Their KV
        blocks are allocated but hold stale values, which changes no timing, so a step at a
        long context can be timed without first prefilling it."""
        seq = self.seqs[request_id]
        if not 0 <= num_tokens < len(seq.token_ids):
            raise ValueError(f"cannot assume {num_tokens} of {len(seq.token_ids)} tokens computed")
        seq.blocks += self.kv.allocator.allocate(self.kv.blocks_needed(num_tokens) - len(seq.blocks))
        seq.num_computed = num_tokens

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.kv.allocator.free(seq.blocks)
        return True

    def step(self, order: BatchOrder) -> StepResult:
        start = time.perf_counter()
        for req in order.new_requests:
            self.add_request(req.request_id, req.prompt_token_ids, req.params)
        for rid in order.aborts:
            self.abort(rid)
        work = [(c.request_id, c.num_tokens) for c in order.prefill]
        work += [(rid, 1) for rid in order.decode]
        items, out_of_blocks = self._reserve(work)
        outputs = self._run(items) if items else []
        return StepResult(outputs, out_of_blocks, time.perf_counter() - start)

    def _reserve(self, work: list[tuple[str, int]]) -> tuple[list[tuple[Sequence, int]], list[str]]:
        """Clamp each item to the tokens it has left and give it the KV blocks it needs."""
        items, out_of_blocks = [], []
        for rid, n in work:
            seq = self.seqs.get(rid)
            if seq is None:
                log.warning("request %s: ordered but unknown (aborted?)", rid)
                continue
            n = min(n, len(seq.token_ids) - seq.num_computed)
            if n <= 0:
                log.warning("request %s: ordered with no tokens left to compute", rid)
                continue
            missing = self.kv.blocks_needed(seq.num_computed + n) - len(seq.blocks)
            try:
                seq.blocks += self.kv.allocator.allocate(max(0, missing))
            except OutOfKVBlocks as exc:
                log.warning("request %s: %s", rid, exc)
                out_of_blocks.append(rid)
                continue
            items.append((seq, n))
        return items, out_of_blocks

    def _run(self, items: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        short: list[tuple[int, int, int, list[int]]] = []  # (flat start, context, new, blocks)
        prefills: list[PrefillSpan] = []
        logits_idx: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in items:
            start, c = len(ids), seq.num_computed
            ids += seq.token_ids[c : c + n]
            positions += range(c, c + n)
            slot_blocks += (seq.blocks[p // bs] for p in range(c, c + n))
            blocks = seq.blocks[: self.kv.blocks_needed(c + n)]
            if n <= SHORT_QUERY_MAX:
                short.append((start, c, n, blocks))
            else:
                prefills.append(PrefillSpan(start, start + n, c + n,
                                            torch.tensor(blocks, device=self.device)))
            seq.num_computed = c + n
            if seq.num_computed == len(seq.token_ids):
                logits_idx.append(len(ids) - 1)
                sampled.append(seq)

        dev = self.device
        pos = torch.tensor(positions, device=dev)
        layout = AttentionLayout(
            slot_blocks=torch.tensor(slot_blocks, device=dev),
            slot_offsets=pos % bs,
            prefills=prefills,
            **self._short_layout(short),
        )
        logits = self.model(
            torch.tensor(ids, device=dev), pos, layout, self.kv.layers,
            torch.tensor(logits_idx, device=dev, dtype=torch.long),
        )
        tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        by_id = {s.request_id: tok for s, tok in zip(sampled, tokens)}
        return [self._advance(seq, by_id.get(seq.request_id)) for seq, _ in items]

    def _short_layout(self, short: list[tuple[int, int, int, list[int]]]) -> dict[str, torch.Tensor]:
        """Padded index, table and causal-mask tensors for the short sequences, built once
        per step and shared by every layer."""
        dev = self.device
        width = max((len(blocks) for *_, blocks in short), default=0)
        q_max = max((n for _, _, n, _ in short), default=0)
        offsets = torch.arange(q_max, device=dev)
        starts = torch.tensor([s for s, *_ in short], device=dev, dtype=torch.long)
        contexts = torch.tensor([c for _, c, _, _ in short], device=dev, dtype=torch.long)
        counts = torch.tensor([n for _, _, n, _ in short], device=dev, dtype=torch.long)
        clamped = torch.minimum(offsets[None, :], (counts - 1)[:, None])
        last_key = contexts[:, None] + clamped  # each query sees keys up to its own position
        keys = torch.arange(width * self.kv.block_size, device=dev)
        return {
            "gather": self._workspace(len(short) * width),
            "short_idx": starts[:, None] + clamped,
            "short_valid": offsets[None, :] < counts[:, None],
            "short_tables": torch.tensor([b + [0] * (width - len(b)) for _, _, _, b in short],
                                         device=dev, dtype=torch.long).view(len(short), width),
            "short_mask": (keys[None, None, :] <= last_key[:, :, None])[:, None],
        }

    def _workspace(self, num_blocks: int) -> torch.Tensor:
        """Room to gather K and V of `num_blocks` blocks. It is kept and grown, never freed:
        large tensors allocated afresh every layer cost page faults on every step."""
        if self._gather.shape[1:2] < (num_blocks,) or self._gather.numel() == 0:
            size = max(num_blocks, 2 * (self._gather.shape[1] if self._gather.numel() else 0))
            self._gather = torch.empty(2, size, *self.kv.data.shape[3:], device=self.device,
                                       dtype=self.dtype)
        return self._gather[:, :num_blocks]

    def _advance(self, seq: Sequence, token: int | None) -> RequestOutput:
        """Append the sampled token (if any), decide whether the request is done, and free it."""
        finish: FinishReason | None = None
        new = []
        if token is not None:
            new.append(token)
            seq.token_ids.append(token)
            p = seq.params
            if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
                finish = "stop"
            elif seq.detokenizer.add(token):
                finish = "stop"
            elif seq.num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
                finish = "length"
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new,
            text=seq.detokenizer.release(finished=finish is not None),
            num_prompt_tokens=seq.num_prompt,
            num_computed_tokens=seq.num_computed,
            num_output_tokens=seq.num_output,
            finish_reason=finish,
        )
        if finish is not None:
            self.abort(seq.request_id)
        return out
