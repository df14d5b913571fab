from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.roofline import (
    BUILTIN_CPU_PROFILE,
    SHIPPED_PROFILES,
    Batches,
    ModelShape,
    Profile,
    ProfileError,
    RooflineParams,
    fit,
    load_profile,
    predict,
    prefill_budget,
    prefill_budgets,
    prefill_cost,
    prefill_within,
    save_profile,
    shipped_cpu_profile,
)

SHAPE = ModelShape("test-1b", layers=16, hidden=2048, heads=16, kv_heads=4, head_dim=128,
                   intermediate=5632, vocab=32000)


def random_batches(n: int, seed: int = 0) -> Batches:
    rng = np.random.default_rng(seed)
    decode = rng.integers(0, 64, n)
    prefill = rng.choice([0, 16, 128, 512, 2048], n) * rng.integers(0, 2, n)
    prefill[(decode == 0) & (prefill == 0)] = 64
    verify = rng.integers(1, 5, n)
    ctx = rng.integers(16, 4096, n)
    seqs = decode + (prefill > 0)
    return Batches.of(prefill_tokens=prefill, decode_seqs=decode, verify_len=verify,
                      kv_read=decode * ctx + prefill, num_seqs=seqs,
                      attention_pairs=decode * verify * ctx + prefill * prefill / 2)


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_fit_recovers_known_parameters(combine: str) -> None:
    truth = RooflineParams(overhead_s=2e-3, per_sequence_s=30e-6, inv_flops=1 / 300e12,
                           inv_bandwidth=1 / 1.5e12, combine=combine)
    b = random_batches(400)
    noise = np.random.default_rng(1).normal(1.0, 0.01, 400)
    got = fit(SHAPE, b, predict(SHAPE, truth, b) * noise)
    assert got.combine == combine
    for field in ("overhead_s", "per_sequence_s", "inv_flops", "inv_bandwidth"):
        assert getattr(got, field) == pytest.approx(getattr(truth, field), rel=0.1), field


def test_predict_is_vectorised_and_monotone() -> None:
    p = RooflineParams(1e-3, 1e-5, 1 / 100e12, 1 / 1e12, "max")
    small = predict(SHAPE, p, Batches.of(decode_seqs=np.arange(1, 65), kv_read=np.arange(1, 65) * 1000))
    assert small.shape == (64,) and np.all(np.diff(small) > 0)
    assert predict(SHAPE, p, Batches.of(prefill_tokens=4096, num_seqs=1)) > predict(
        SHAPE, p, Batches.of(prefill_tokens=512, num_seqs=1))


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_prefill_budget_fills_the_step_exactly(combine: str) -> None:
    p = RooflineParams(2e-3, 20e-6, 1 / 200e12, 1 / 1e12, combine)
    for decode, kv in ((0, 0), (16, 16 * 1000), (64, 64 * 3000)):
        budget = prefill_budget(SHAPE, p, 0.05, decode, 1, kv)
        at = Batches.of(prefill_tokens=[budget, budget + 8], decode_seqs=decode, kv_read=[kv + budget, kv + budget + 8],
                        num_seqs=decode + 1, attention_pairs=decode * kv / max(decode, 1))
        t = predict(SHAPE, p, at)
        assert budget > 0 and t[0] <= 0.05 < t[1]
    assert prefill_budget(SHAPE, p, 0.001, 8, 1, 8000) == 0


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_a_chunk_deep_into_its_prompt_gets_the_budget_its_memory_traffic_leaves(combine: str) -> None:
    """Beside a decode batch whose KV reads nearly fill the step, a chunk reading the prompt
    before it fits in fewer tokens: the budget counts that read, as `predict` does."""
    p = RooflineParams(0.0, 0.0, 1 / 300e12, 1 / 1.3e12, combine)
    decode, kv = 64, 64 * 20_000
    step = float(predict(SHAPE, p, Batches.of(decode_seqs=decode, kv_read=kv, attention_pairs=kv))) * 1.003
    alone = int(prefill_budgets(SHAPE, p, step, decode, 1.0, kv))
    deep = int(prefill_budgets(SHAPE, p, step, decode, 1.0, kv, chunk_kv=2000))
    assert 0 < deep < alone
    for before, budget in ((0, alone), (2000, deep)):
        t = predict(SHAPE, p, Batches.of(prefill_tokens=[budget, budget + 8], decode_seqs=decode,
                                         kv_read=[kv + before + budget, kv + before + budget + 8],
                                         num_seqs=decode + 1, attention_pairs=kv))
        assert t[0] <= step < t[1]


def test_profile_round_trip_and_validation(tmp_path: Path) -> None:
    prof = Profile(model=SHAPE, hardware="test", params=RooflineParams(1e-3, 0.0, 1e-14, 1e-12))
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert load_profile(path, expect=SHAPE) == prof
    with pytest.raises(ProfileError, match="model shape"):
        load_profile(path, expect=msgspec.structs.replace(SHAPE, layers=32))
    path.write_text('{"model": 3}')
    with pytest.raises(ProfileError, match="not a valid profile"):
        load_profile(path)
    path.write_text("not json")
    with pytest.raises(ProfileError, match="not a valid profile"):
        load_profile(path)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


def test_shipped_gpu_profiles_load_and_rank_sensibly() -> None:
    files = sorted(f for f in SHIPPED_PROFILES.glob("*.json") if f.name.startswith(("a100", "h100")))
    assert len(files) == 12
    one = Batches.of(decode_seqs=32, kv_read=32 * 1024, attention_pairs=32 * 1024)
    t = {f.stem: float(load_profile(f).predict(one)) for f in files}
    assert t["h100-sxm_llama-2-7b"] < t["a100-80gb_llama-2-7b"]
    assert t["a100-80gb_llama-2-7b"] < t["a100-80gb_llama-2-13b"] < t["a100-80gb_llama-30b"]
    assert 0.003 < t["a100-80gb_llama-2-7b"] < 0.05  # a 7B decode step on an A100: ~10-20 ms


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=12))
def test_a_prompt_costs_the_same_however_it_is_chunked(chunks: list[int]) -> None:
    done = np.concatenate([[0], np.cumsum(chunks)[:-1]])
    assert float(prefill_cost(SHAPE, chunks, done).sum()) == pytest.approx(float(prefill_cost(SHAPE, sum(chunks))))


@given(st.floats(0.0, 1e5), st.integers(0, 100_000))
def test_the_chunk_within_a_budget_is_the_longest_whose_cost_fits(cost: float, done: int) -> None:
    t = prefill_within(SHAPE, cost, done)
    assert t >= 0 and float(prefill_cost(SHAPE, t, done)) <= cost * (1 + 1e-9)
    assert float(prefill_cost(SHAPE, t + 1, done)) > cost


def test_the_prefill_cost_is_what_a_compute_bound_step_takes() -> None:
    compute_only = RooflineParams(0.0, 0.0, 1 / 100e12, 0.0, "sum")
    tokens, done = np.array([1, 512, 4096]), np.array([0, 3000, 100])
    seconds = predict(SHAPE, compute_only, Batches.of(prefill_tokens=tokens, num_seqs=1, kv_read=done + tokens,
                                                      attention_pairs=tokens * (done + tokens / 2)))
    assert prefill_cost(SHAPE, tokens, done) * SHAPE.flops_per_token / 100e12 == pytest.approx(seconds)
    assert prefill_cost(SHAPE, 1) == pytest.approx(1.0, rel=1e-3) and prefill_cost(SHAPE, 4096) > 4096


def test_a_served_model_gets_the_shipped_cpu_profile_of_its_shape(tmp_path: Path) -> None:
    smollm2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
               "intermediate_size": 1536, "vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(smollm2))
    assert shipped_cpu_profile(tmp_path).name == "cpu-2_smollm2-135m-instruct.json"
    (tmp_path / "config.json").write_text(json.dumps({**smollm2, "num_hidden_layers": 29}))
    assert shipped_cpu_profile(tmp_path) == shipped_cpu_profile(None) == BUILTIN_CPU_PROFILE
