"""The speculation bench counts what the engine did: every generated token, every step."""

from __future__ import annotations

from pathlib import Path

from bench.spec_bench import measure
from engine.engine import Engine


def test_measure_counts_tokens_steps_and_acceptance(tiny_model: Path) -> None:
    engine = Engine(tiny_model, kv_cache_mb=4, speculator="draft", draft_dir=tiny_model)  # agrees with itself
    prompts = [[11, 12, 13, 11, 12, 13, 11, 12], [40, 41, 42, 43], [7] * 9]
    plain = measure(engine, "toy", "draft", prompts, batch=2, k=0, new_tokens=12)
    spec = measure(engine, "toy", "draft", prompts, batch=2, k=4, new_tokens=12)
    assert plain.proposer == "none" and plain.tokens_per_step == 1.0 and plain.acceptance == 0.0
    assert spec.proposer == "draft" and 0.9 <= spec.acceptance <= 1.0
    assert 3.0 < spec.tokens_per_step <= 5.0
    assert plain.tpot_ms > 0 and plain.decode_tok_s > 0
    assert engine.num_free_blocks == engine.kv.allocator.num_blocks
