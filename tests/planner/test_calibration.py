"""Learning how a worker's steps run against the profile: two factors when the steps differ
enough to tell fixed cost from work, one when they do not, and headroom from the error left."""

from __future__ import annotations

import numpy as np
import pytest

from planner.calibration import StepFit


def test_recovers_separate_factors_for_fixed_cost_and_work() -> None:
    fit = StepFit()
    rng = np.random.default_rng(0)
    for _ in range(64):
        fixed, work = 0.002, float(rng.uniform(0.001, 0.05))  # decode-sized to prefill-sized steps
        fit.add(fixed, work, 6.0 * fixed + 1.5 * work)
    assert fit.fixed == pytest.approx(6.0, rel=1e-6) and fit.work == pytest.approx(1.5, rel=1e-6)
    assert fit.headroom > 0.99  # exact by now


def test_steps_too_alike_share_one_factor_and_noise_buys_headroom() -> None:
    fit = StepFit()
    rng = np.random.default_rng(1)
    for _ in range(64):
        fit.add(0.002, 0.008, 0.03 * float(rng.uniform(0.7, 1.3)))
    assert fit.fixed == fit.work == pytest.approx(3.0, rel=0.1)
    assert 0.8 < fit.headroom < 0.95
    fit.add(0.0, 0.0, 1.0)  # nothing predicted: nothing learned
    assert len(fit.steps) == 64
