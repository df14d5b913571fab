"""Greedy tokens of the engine equal those of `transformers` with the same weights, whatever
the batch composition, chunk size and block size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.drive import GREEDY, drive
from engine.engine import Engine
from engine_driver import DEVICES
from shared.messages import SamplingParams

PROMPT_LENGTHS = [1, 5, 17, 33, 64]


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[int, list[int]]:
    """Greedy continuation of each prompt by full recomputation, no KV cache at all."""
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    out = {}
    with torch.no_grad():
        for i, prompt in enumerate(prompts(hf.config.vocab_size)):
            ids = list(prompt)
            for _ in range(GREEDY.max_tokens):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            out[i] = ids[len(prompt):]
    return out


@pytest.mark.parametrize("chunk,stagger,block_size", [
    (1024, 0, 16),   # whole prompts, all in one batch
    (1, 1, 4),       # token-by-token prefill beside decodes
    (7, 2, 4),
    (16, 3, 16),
    (5, 1, 8),
])
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_transformers(tiny_model: Path, reference: dict[int, list[int]],
                                     chunk: int, stagger: int, block_size: int, device: str) -> None:
    engine = Engine(tiny_model, block_size=block_size, kv_cache_mb=4, device=device, dtype=torch.float32)
    got = drive(engine, prompts(engine.cfg.vocab_size), chunk, stagger)
    for i, ref in reference.items():
        assert got[f"r{i}"] == ref, f"request {i} (prompt of {PROMPT_LENGTHS[i]} tokens)"
    assert engine.num_free_blocks == engine.kv.allocator.num_blocks


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_does_not_depend_on_batch(tiny_model: Path, device: str) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    engine = Engine(tiny_model, kv_cache_mb=4, device=device, dtype=torch.float32)
    reqs = prompts(engine.cfg.vocab_size)
    alone = drive(engine, reqs[2:3], chunk=64, stagger=0, params=params)["r0"]
    batched = drive(engine, reqs, chunk=3, stagger=1, params=params)["r2"]
    other_seed = drive(engine, reqs[2:3], chunk=64, stagger=0,
                       params=SamplingParams(max_tokens=10, temperature=0.9, seed=8, ignore_eos=True))["r0"]
    assert alone == batched
    assert alone != other_seed
