"""The speculative-length choice on a memory-bound model, where verifying more tokens per
step costs little and speculation pays exactly when proposals are accepted."""

from __future__ import annotations

import pytest

from planner.spec_choice import acceptance_from_rate, choose_spec_len, expected_tokens, options
from shared.roofline import Batches, ModelShape, Profile, RooflineParams

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_acceptance_from_rate_inverts_the_reported_share(alpha: float, k: int) -> None:
    rate = (expected_tokens(alpha, k) - 1) / k
    assert acceptance_from_rate(rate, k) == pytest.approx(alpha, abs=1e-6)


def test_no_acceptance_means_no_speculation() -> None:
    choice = choose_spec_len(GPU, tpot_s=0.05, batch=16, context=1024, alpha=0.0)
    assert choice is not None and choice.k == 0


def test_good_acceptance_speculates_and_frees_prefill_budget() -> None:
    plain = options(GPU, 0.05, 16, 1024, alpha=0.8)[0]
    choice = choose_spec_len(GPU, tpot_s=0.05, batch=16, context=1024, alpha=0.8)
    assert plain.k == 0 and choice is not None and choice.k > 0
    assert choice.prefill_tokens_per_s > plain.prefill_tokens_per_s


def test_a_tpot_only_speculation_can_meet() -> None:
    step = float(GPU.predict(Batches.of(decode_seqs=16, kv_read=16 * 1024)))
    tight = 0.8 * step  # plain decoding is too slow for it
    assert choose_spec_len(GPU, tight, 16, 1024, alpha=0.0) is None
    choice = choose_spec_len(GPU, tight, 16, 1024, alpha=0.8)
    assert choice is not None and choice.k > 0 and choice.decode_s <= choice.step_s
