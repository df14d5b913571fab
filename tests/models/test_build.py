"""A draft distilled for a target (`slos-serve model make --draft-for`): it shares the target's
vocabulary and tokenizer, the engine speculates with it, and greedy output stays the target's."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.drive import drive
from engine.engine import Engine
from models.build import Shape, TrainPlan, make_draft
from shared.messages import SamplingParams

TINY_DRAFT = Shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=0)


def test_a_distilled_draft_speculates_for_its_target(tiny_model: Path, tmp_path: Path) -> None:
    plan = TrainPlan(corpus_chars=40_000, seq_len=32, batch=2, draft_steps=4)
    losses: list[float] = []
    metrics = make_draft(tiny_model, tmp_path / "draft", lambda name, step, total, info: losses.append(info["loss"]),
                         plan, TINY_DRAFT)
    assert len(losses) == plan.draft_steps and 0.0 <= metrics["draft_agreement"] <= 1.0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "draft")) == len(AutoTokenizer.from_pretrained(tiny_model))
    prompts = [[11, 12, 13, 14, 15] * 3, [40, 41, 42]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    plain = drive(Engine(tiny_model, kv_cache_mb=4, dtype=torch.float32), prompts, 64, 0, params)
    speculating = Engine(tiny_model, kv_cache_mb=4, dtype=torch.float32, speculator="draft",
                         draft_dir=tmp_path / "draft")
    assert drive(speculating, prompts, 64, 0, params, spec_len=lambda i, step: 3) == plain
