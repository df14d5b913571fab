"""Learning how a worker's steps run against the profile: a constant turnaround and a factor
each on fixed cost, compute and memory when the steps tell them apart, fewer terms when they
do not, and a margin that makes the priced steps last at least as long as most measured ones."""

from __future__ import annotations

import numpy as np
import pytest

from planner.calibration import COLD_MARGIN, LIMITS, MAX_TURNAROUND_S, MIN_STEPS, QUANTILE, WINDOW, StepFit
from shared.roofline import Batches, load_profile, shipped_cpu_profile, split


def test_recovers_turnaround_and_separate_factors() -> None:
    """As live with a profile of two threads on a worker given one: compute runs 30 times
    slower than profiled (beyond what one factor for all could follow), memory barely."""
    fit = StepFit()
    rng = np.random.default_rng(0)
    for _ in range(WINDOW):
        fixed, compute, memory = (float(x) for x in rng.uniform(0.001, 0.02, 3))
        fit.add(fixed, compute, memory, 0.018 + 3.0 * fixed + 30.0 * compute + 1.2 * memory)
    assert fit.turnaround == pytest.approx(0.018, rel=1e-6)
    assert (fit.fixed, fit.compute, fit.memory) == pytest.approx((3.0, 30.0, 1.2), rel=1e-6)
    assert fit.margin == pytest.approx(1.0)  # exact: no margin needed


def test_exact_profile_learns_nothing() -> None:
    """As in the simulator: steps take what the profile says."""
    fit = StepFit()
    rng = np.random.default_rng(1)
    for _ in range(WINDOW):
        fixed, compute, memory = (float(x) for x in rng.uniform(0.001, 0.02, 3))
        fit.add(fixed, compute, memory, fixed + compute + memory)
    assert (fit.turnaround, fit.fixed, fit.compute, fit.memory, fit.margin) == pytest.approx((0, 1, 1, 1, 1), abs=1e-9)


def test_margin_covers_the_quantile_of_noisy_steps() -> None:
    """A promise priced with the margin holds for about the QUANTILE of steps as they run."""
    fit = StepFit()
    assert fit.margin == COLD_MARGIN
    rng = np.random.default_rng(2)
    shapes = rng.uniform(0.001, 0.05, size=(2000, 3))
    times = (0.01 + shapes.sum(axis=1)) * rng.lognormal(0.0, 0.15, size=2000)
    covered = []
    for parts, t in zip(shapes.tolist(), times.tolist()):
        if fit.seen >= MIN_STEPS:
            covered.append(t <= fit.margin * fit.predict(*parts))
        fit.add(*parts, t)
    assert 1.15 < fit.margin < 1.6
    assert QUANTILE - 0.05 <= np.mean(covered) <= min(1.0, QUANTILE + 0.05)


def test_steps_all_alike_fit_one_factor_and_stay_in_bounds() -> None:
    fit = StepFit()
    for _ in range(WINDOW):
        fit.add(0.002, 0.003, 0.005, 0.03)
    assert fit.predict(0.002, 0.003, 0.005) == pytest.approx(0.03, rel=1e-6)
    fit.add(0.0, 0.0, 0.0, 1.0)  # nothing predicted: nothing learned
    fit.add(0.001, 0.001, 0.001, float("inf"))
    assert fit.seen == WINDOW
    for _ in range(WINDOW):  # a measurement gone wrong does not make factors without bound
        fit.add(0.002, 0.003, 0.005, 500.0)
    factors = (fit.fixed, fit.compute, fit.memory)
    assert all(LIMITS[0] <= f <= LIMITS[1] for f in factors) and 0.0 <= fit.turnaround <= MAX_TURNAROUND_S


def test_priced_profile_predicts_the_margin_over_the_fit() -> None:
    profile = load_profile(shipped_cpu_profile(None))
    fit = StepFit(turnaround=0.01, fixed=2.0, compute=8.0, memory=1.5, margin=1.2)
    b = Batches.of(prefill_tokens=128, decode_seqs=4, kv_read=2000, num_seqs=5)
    parts = tuple(float(np.ravel(x)[0]) for x in split(profile.model, profile.params, b))
    assert float(np.ravel(fit.fitted(profile).predict(b))[0]) == pytest.approx(fit.predict(*parts))
    assert float(np.ravel(fit.priced(profile).predict(b))[0]) == pytest.approx(1.2 * fit.predict(*parts))



def test_what_a_large_prefill_costs_is_not_forgotten_while_only_small_steps_run() -> None:
    """Seen live: after a stretch of decode steps and small chunks, the recent steps held none
    of the large prefill chunks, compute was fit at a third of its factor, and the next large
    chunks ran twice as long as priced, past the TPOT of the requests decoding beside them.
    Steps are kept by the share of compute in them, so the fit still knows what compute costs.
    (The steps' shapes and factors are those of that run; the code before fit compute at
    0.48-0.53 in five of these ten draws.)"""

    def truth(fixed: float, compute: float, memory: float) -> float:
        return 0.003 + 1.5 * fixed + 0.65 * compute + memory

    for seed in range(10):
        rng = np.random.default_rng(seed)
        fit = StepFit()
        for _ in range(40):  # large chunks: mostly compute
            parts = (0.0013, float(rng.uniform(0.02, 0.08)), 0.005)
            fit.add(*parts, truth(*parts) * float(rng.lognormal(0.0, 0.1)))
        for _ in range(300):  # then decode steps and small chunks only
            parts = tuple(float(rng.uniform(lo, hi)) for lo, hi in ((0.0011, 0.0014), (0.0004, 0.004), (0.0044, 0.0048)))
            fit.add(*parts, truth(*parts) * float(rng.lognormal(0.0, 0.1)))
        big = (0.0013, 0.035, 0.005)
        assert fit.compute == pytest.approx(0.65, rel=0.1) and fit.margin * fit.predict(*big) >= truth(*big)
