"""How each worker's steps really run against the performance model, learned as they run, and
the margin a promise needs on top.

A profile measured on an idle engine is wrong live, and wrong differently for different
steps: every step also pays the loop around it (the order's trip, sampling, the report, the
planner's turnaround), a constant that weighs most on small decode steps; shared cores slow
the rest; and a worker given fewer threads than the profile was measured with computes much
slower while it reads memory about as fast. So each worker keeps its recent steps as (the
profile's fixed cost, compute and memory time, the time the step took, from order to report)
and fits t = c + a·fixed + b·compute + d·memory by least squares on relative error, with the
fewest terms that explain the steps: steps all alike cannot tell the terms apart, so an
information criterion picks among a handful of models, from one factor for everything up.
The steps are kept by the share of compute in their predicted time, the latest `PER_BAND` of
each of `BANDS` bands: the latest steps alone forget, during a stretch of decode steps and
small chunks, what a large prefill chunk costs, and the fit then prices the next one at a
fraction of its time (seen live: compute at a third of its factor, and large chunks twice as
long as priced, past the TPOT of the requests decoding beside them).

The fit is the mean; a promise must hold when steps run long. So the policies price every
batch at the `QUANTILE` of the window's measured-to-fitted ratios (`margin`, never below 1):
a plan keeps its TPOTs and TTFTs when steps run as slow as that quantile. In the simulator,
where steps take what the profile says, the fit is exact and the margin 1. Until `MIN_STEPS`
steps have been seen nothing is known, and the margin is `COLD_MARGIN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shared.roofline import Profile

BANDS = 4  # of the compute share of a step's predicted time, each as wide
PER_BAND = 32  # recent steps kept in each band
WINDOW = BANDS * PER_BAND  # steps kept per worker, at most
MIN_STEPS = 8  # steps before the fit replaces the profile as it is
REFIT_EVERY = 16  # steps between fits (a pass over the window: about 1 ms)
LIMITS = (0.1, 100.0)  # a factor outside these is a measurement gone wrong
MAX_TURNAROUND_S = 1.0  # and so is a constant per-step cost beyond this
QUANTILE = 0.98  # of measured-to-fitted step times, at which promises are priced
COLD_MARGIN = 1.5  # the margin before the worker's steps are known
ERROR_WEIGHT = 0.05  # of each step in the smoothed prediction error (reported, not priced)

# the models tried: each row says which of (turnaround, fixed, compute, memory) a fitted
# coefficient multiplies; the coefficients of the terms a model leaves out are 0 (turnaround)
# or shared, as the rows say. A coefficient the data push past its bounds is held at the bound
# and the others refitted, so a model with a turnaround covers the one without.
def _model(*rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model's rows, and the bounds of its coefficients (a turnaround's or a factor's)."""
    m = np.array(rows, dtype=np.float64)
    turnaround = m[:, 0] > 0
    return m, np.where(turnaround, 0.0, LIMITS[0]), np.where(turnaround, MAX_TURNAROUND_S, LIMITS[1])


_MODELS = (
    _model([0, 1, 1, 1]),  # one factor for everything
    _model([1, 0, 0, 0], [0, 1, 1, 1]),  # a turnaround and one factor
    _model([1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]),  # a turnaround, one factor on compute, one on the rest
    _model([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]),  # a turnaround, one factor on the fixed cost, one on the roofline
    _model([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]),  # all four
)


@dataclass
class StepFit:
    steps: np.ndarray = field(default_factory=lambda: np.zeros((WINDOW, 4)))  # (fixed, compute, memory, seconds)
    in_band: np.ndarray = field(default_factory=lambda: np.zeros(BANDS, dtype=np.int64))  # steps seen in each band
    seen: int = 0
    turnaround: float = 0.0  # seconds each step takes beyond the profile
    fixed: float = 1.0  # factors on the profile's fixed cost, compute and memory time
    compute: float = 1.0
    memory: float = 1.0
    margin: float = COLD_MARGIN  # how much longer than fitted a promise prices each step
    error: float = 0.0  # mean relative error of the fit's predictions, smoothed

    def add(self, fixed_s: float, compute_s: float, memory_s: float, seconds: float) -> None:
        """One step: the profile's three parts of it and the time it took."""
        if fixed_s + compute_s + memory_s <= 0 or seconds <= 0 or not math.isfinite(seconds):
            return
        miss = abs(self.predict(fixed_s, compute_s, memory_s) - seconds) / seconds
        self.error = (1 - ERROR_WEIGHT) * self.error + ERROR_WEIGHT * miss
        band = min(BANDS - 1, int(BANDS * compute_s / (fixed_s + compute_s + memory_s)))
        self.steps[band * PER_BAND + self.in_band[band] % PER_BAND] = fixed_s, compute_s, memory_s, seconds
        self.in_band[band] += 1
        self.seen += 1
        if self.seen >= MIN_STEPS and (self.seen - MIN_STEPS) % REFIT_EVERY == 0:
            kept = np.arange(PER_BAND)[None, :] < self.in_band[:, None]
            self._refit(self.steps[kept.ravel()])

    def predict(self, fixed_s: float, compute_s: float, memory_s: float) -> float:
        """The fitted time of a step (the mean, without the margin)."""
        return self.turnaround + self.fixed * fixed_s + self.compute * compute_s + self.memory * memory_s

    def fitted(self, profile: Profile) -> Profile:
        """The profile as this worker's steps run on average."""
        return profile.rescaled(self.fixed, self.compute, self.memory, self.turnaround)

    def priced(self, profile: Profile) -> Profile:
        """The profile a promise is priced with: steps as slow as the margin says they run."""
        m = self.margin
        return profile.rescaled(self.fixed * m, self.compute * m, self.memory * m, self.turnaround * m)

    def _refit(self, steps: np.ndarray) -> None:
        """Least squares on relative error, (c + a f + b g + d m - t) / t, for each model; the
        one with the best information criterion whose coefficients are within bounds wins."""
        t = steps[:, 3]
        x = np.column_stack([np.ones(len(t)), steps[:, :3]]) / t[:, None]
        gram, sums = x.T @ x, x.sum(axis=0)  # the normal equations, shared by every model
        n, best, chosen = len(t), math.inf, None
        for model, lower, upper in _MODELS:
            g, r = model @ gram @ model.T, model @ sums
            coef = _bounded_solve(g, r, lower, upper)
            if coef is None:
                continue
            rss = max(0.0, float(coef @ g @ coef - 2 * coef @ r + n))
            score = n * math.log(rss / n + 1e-12) + 2 * len(model)
            if score < best - 1e-9:
                best, chosen = score, tuple((coef @ model).tolist())
        if chosen is None:  # every model singular: one factor, clipped
            one = min(max(float(np.sum(t) / np.sum(steps[:, :3])), LIMITS[0]), LIMITS[1])
            chosen = (0.0, one, one, one)
        self.turnaround, self.fixed, self.compute, self.memory = chosen
        ratios = t / (self.turnaround + steps[:, :3] @ np.array(chosen[1:]))
        k = math.ceil(QUANTILE * n) - 1
        self.margin = max(1.0, float(np.partition(ratios, k)[k]))


def _bounded_solve(g: np.ndarray, r: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray | None:
    """Least squares from its normal equations g x = r with lower <= x <= upper: the
    coefficient furthest past its bounds is held there and the rest solved again, until all
    are within. None when singular."""
    k = len(r)
    x, free = np.zeros(k), np.ones(k, dtype=bool)
    while free.any():
        f = np.flatnonzero(free)
        try:
            x[f] = np.linalg.solve(g[np.ix_(f, f)], r[f] - g[np.ix_(f, ~free)] @ x[~free])
        except np.linalg.LinAlgError:
            return None
        past = np.maximum(lower - x, x - upper) / (upper - lower)
        past[~free] = 0.0
        worst = int(np.argmax(past))
        if past[worst] <= 0.0:
            break
        x[worst] = min(max(x[worst], lower[worst]), upper[worst])
        free[worst] = False
    return x
