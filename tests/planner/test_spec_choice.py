"""The speculative-length choice on a memory-bound model, where verifying more tokens per
step costs little and speculation pays exactly when proposals are accepted; and the floor
raised for speed, which pays only where proposals are accepted and never outlasts the period."""

from __future__ import annotations

import numpy as np
import pytest

from planner.spec_choice import (
    PROMISE_STEPS,
    choose_spec_len,
    expected_tokens,
    fastest_floor,
    gains_row,
    options,
    periods,
    promised_gains_row,
    spread_tokens,
)
from shared.roofline import Batches, ModelShape, Profile, RooflineParams

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_step_gains_tokens_with_the_spread_the_draws_have(alpha: float, k: int) -> None:
    """Proposals accepted one by one with probability α, up to the first rejection: the mean
    and spread of the tokens a step gains are what `expected_tokens` and `spread_tokens` say."""
    rng = np.random.default_rng(0)
    accepted = np.minimum(rng.geometric(1 - alpha, 200_000) - 1, k)  # accepted before the first rejection
    assert (1 + accepted).mean() == pytest.approx(expected_tokens(alpha, k), rel=0.01)
    assert (1 + accepted).std() == pytest.approx(spread_tokens(alpha, k), rel=0.02)


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_a_promise_counts_on_what_the_draws_give_over_its_steps_nineteen_times_in_twenty(alpha: float) -> None:
    """What a TPOT promise counts on per step is below the mean (never below the target's own
    token) and is what the mean over PROMISE_STEPS drawn steps reaches about 95 % of the time:
    a plan priced at the mean would see a request at whole periods run behind half the time."""
    promised, mean = promised_gains_row(alpha, 8)[0], gains_row(alpha, 8)[0]
    assert promised[0] == mean[0] == 1.0
    assert (promised[1:] < mean[1:]).all() and (promised >= 1.0).all()
    rng = np.random.default_rng(1)
    for k in (2, 4, 8):
        draws = 1 + np.minimum(rng.geometric(1 - alpha, (20_000, int(PROMISE_STEPS))) - 1, k)
        assert 0.92 <= (draws.mean(axis=1) >= promised[k]).mean() <= 0.98


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


def prefill_only(tokens: int) -> Batches:
    return Batches.of(prefill_tokens=tokens, verify_len=0, kv_read=tokens, num_seqs=int(tokens > 0),
                      attention_pairs=tokens * tokens / 2)


def decode_step(context: np.ndarray, lens: np.ndarray, prefill: int = 0) -> Batches:
    return Batches.of(prefill_tokens=prefill, decode_seqs=len(context), verify_len=float((lens + 1).mean()),
                      kv_read=context.sum() + prefill, num_seqs=len(context) + (prefill > 0),
                      attention_pairs=((lens + 1) * context).sum() + prefill * prefill / 2)


def tokens_per_s(context: np.ndarray, lens: np.ndarray, gains: np.ndarray, prefill: int = 0) -> float:
    tokens = np.take_along_axis(gains, lens[:, None], axis=1).sum()
    return float(tokens / GPU.predict(decode_step(context, lens, prefill)))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("batch", [4, 64, 256])
def test_the_floor_for_speed_decodes_fastest_and_pays_only_with_acceptance(alpha: float, batch: int) -> None:
    rng = np.random.default_rng(batch)
    context = rng.integers(100, 2000, batch).astype(np.float64)
    base = rng.integers(0, 3, batch) * (rng.random(batch) < 0.3)  # some already speculate for their TPOT
    gains = np.repeat(gains_row(alpha, 8), batch, axis=0)
    lens = fastest_floor(GPU, prefill_only(0), context, base, gains, np.inf)
    assert (lens >= base).all()
    assert len(set((lens[lens > base]).tolist())) <= 1  # one floor for all
    best = tokens_per_s(context, lens, gains)
    for floor in range(9):
        assert best >= tokens_per_s(context, np.maximum(base, floor), gains) - 1e-9
    if alpha == 0.0:
        assert (lens == base).all()


def test_the_floor_for_speed_keeps_the_step_within_its_period() -> None:
    context = np.full(32, 1000.0)
    base = np.zeros(32, dtype=np.int64)
    gains = np.repeat(gains_row(0.9, 8), 32, axis=0)
    free = fastest_floor(GPU, prefill_only(0), context, base, gains, np.inf)
    assert free.max() > 0
    period = float(GPU.predict(decode_step(context, base, prefill=2000))) * 1.01  # a prefill nearly fills it
    lens = fastest_floor(GPU, prefill_only(2000), context, base, gains, period)
    assert float(GPU.predict(decode_step(context, lens, prefill=2000))) <= period
    assert (lens < free).all()


def test_looser_decoders_verify_only_what_their_own_tpot_needs() -> None:
    """32 decoding, 4 of them at 20 ms and 28 at 100 ms, acceptance 0.8: the period is set by
    the 20 ms tier, and pricing the 28 at the k their own TPOT needs leaves more prefill budget
    than pricing everyone at the tight tier's k. The budget is still a bound: a step with each
    decoder at its own k and that many prefill tokens (their attention aside, which prefill_cost
    prices) lasts no longer than the period."""
    alpha, batch, context = 0.8, np.array([32]), np.array([800])
    looser = np.array([0.02] * 4 + [0.1] * 28)
    k_all, step_all, budget_all = periods(GPU, 0.02, batch, context, alpha)
    k, step, budget = periods(GPU, 0.02, batch, context, alpha, looser=looser)
    assert budget[0] > budget_all[0] > 0
    gains = promised_gains_row(alpha, 10)[0]
    own = [int(np.searchsorted(gains, step[0] / t * (1 - 1e-9))) for t in looser]
    assert own[:4] == [k[0]] * 4 and max(own[4:]) < k[0]
    verified = sum(1 + n for n in own)
    seconds = GPU.predict(Batches.of(prefill_tokens=budget[0], decode_seqs=32, verify_len=verified / 32,
                                     kv_read=32 * 800 + verified, num_seqs=33,
                                     attention_pairs=verified * 800))
    assert seconds <= step[0] + 1e-12


@pytest.mark.parametrize("alpha, waiting", [(0.0, 300.0), (0.8, 300.0), (0.8, 2.0), (0.8, 1e6)])
def test_a_period_with_little_waiting_is_cut_to_one_batch_of_it_at_the_same_k(alpha: float, waiting: float) -> None:
    """At a loose TPOT the period is long; with only `waiting` budget tokens to prefill, the
    periods are cut alike to a batch that still holds them beside the decoders at the same k
    (whose TPOT a shorter step keeps the more), and such a batch lasts no longer than the cut
    period. With more waiting than any period holds, nothing is cut."""
    batch, context = np.array([8, 9, 10]), np.array([800, 800, 800])
    k0, step0, budget0 = periods(GPU, 0.2, batch, context, alpha, max_k=4, keep_first=True)  # as the planner asks
    k, step, budget = periods(GPU, 0.2, batch, context, alpha, max_k=4, keep_first=True, waiting=waiting)
    assert (k == k0).all()
    if waiting > budget0.min():
        assert (step == step0).all() and (budget == budget0).all()
        return
    assert (step < step0).all() and (budget >= waiting).all() and len(set(step.tolist())) == len(set(step0.tolist()))
    verify = 1 + k
    seconds = GPU.predict(Batches.of(prefill_tokens=budget, decode_seqs=batch, verify_len=verify,
                                     kv_read=batch * (context + verify), num_seqs=batch + 1,
                                     attention_pairs=batch * verify * context))
    assert (seconds <= step + 1e-12).all()
