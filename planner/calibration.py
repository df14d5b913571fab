"""How each worker's steps really run against the performance model, learned as they run.

A profile measured on an idle machine is wrong on a busy one, and wrong differently for
different steps: shared cores slow small, overhead-bound decode steps far more than big
prefill ones. So each worker keeps its recent steps as (the profile's fixed cost, the
profile's roofline, the time the step took, from order to report) and fits two factors by
least squares on relative error: one for the fixed part, one for the roofline. With steps
too alike to tell the two apart, one factor serves for both. The policies price that worker's
batches with the profile so rescaled; the planner's own turnaround between steps is part of
the measured time, as it is part of every token's wait. How far off the rescaled profile
still is (the mean relative error of its predictions, smoothed) is the headroom the policies
leave below each TPOT: none where the model is exact, as in the simulator.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 64  # recent steps kept per worker
LIMITS = (0.2, 20.0)  # a factor outside these is a measurement gone wrong
ERROR_WEIGHT = 0.05  # of each step in the smoothed prediction error
MAX_HEADROOM = 0.25  # the most of a TPOT left as headroom


@dataclass
class StepFit:
    steps: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    fixed: float = 1.0
    work: float = 1.0
    error: float = 0.0  # mean relative error of the rescaled profile's predictions, smoothed
    headroom: float = 1.0  # the share of a TPOT to plan batches to
    _sums: list[float] = field(default_factory=lambda: [0.0] * 7)  # of the window's steps, for the fit

    def add(self, fixed_s: float, work_s: float, seconds: float) -> None:
        """One step: the profile's two parts of it and the time it took; refits."""
        if fixed_s + work_s <= 0 or seconds <= 0:
            return
        miss = abs(self.fixed * fixed_s + self.work * work_s - seconds) / seconds
        self.error = (1 - ERROR_WEIGHT) * self.error + ERROR_WEIGHT * miss
        self.headroom = 1.0 - min(self.error, MAX_HEADROOM)
        if len(self.steps) == self.steps.maxlen:
            self._count(*self.steps[0], -1.0)
        self.steps.append((fixed_s, work_s, seconds))
        self._count(fixed_s, work_s, seconds, 1.0)
        # weighted least squares on relative error: minimise sum ((a f + b w - t) / t)^2
        sff, sfw, sww, sft, swt, st, s_parts = self._sums
        det = sff * sww - sfw * sfw
        if det > 1e-6 * sff * sww:
            a, b = (sft * sww - swt * sfw) / det, (swt * sff - sft * sfw) / det
            if a > 0 and b > 0:
                self.fixed, self.work = (min(max(x, LIMITS[0]), LIMITS[1]) for x in (a, b))
                return
        one = st / s_parts
        self.fixed = self.work = min(max(one, LIMITS[0]), LIMITS[1])

    def _count(self, fixed_s: float, work_s: float, seconds: float, sign: float) -> None:
        """Add a step to the window's running sums (sign 1), or take one out (sign -1)."""
        f, w = fixed_s / seconds, work_s / seconds
        for i, x in enumerate((f * f, f * w, w * w, f, w, seconds, fixed_s + work_s)):
            self._sums[i] += sign * x
