"""How many tokens a request will write, when all the planner knows is its class and its stages.

A request that sets a stage of N tokens (say, thinking) says it will write those; what it writes
past its stages (the answer) is what each class learns. Each class starts from its configured
typical length and then follows the lengths of its finished requests (an exponential average,
so it tracks a workload that changes). A request that outlives its estimate is re-estimated at
twice what it has written so far, capped by its `max_tokens`: the plan grows with it instead of
trusting a number already proven wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_OUTPUT_TOKENS = 256
SMOOTHING = 0.05  # weight of one finished request, once a class has seen 1 / SMOOTHING of them


@dataclass
class LengthModel:
    typical: dict[str, int] = field(default_factory=dict)  # configured, per class: tokens past its stages
    means: dict[str, float] = field(default_factory=dict)  # learned, tokens past the stages
    seen: dict[str, int] = field(default_factory=dict)

    def estimate(self, slo_class: str | None, staged: int = 0) -> int:
        """Output tokens of a request of the class whose stages cover `staged` tokens."""
        key = slo_class or ""
        past = round(self.means[key]) if key in self.means else self.typical.get(key, DEFAULT_OUTPUT_TOKENS)
        return staged + max(1, past)

    def observe(self, slo_class: str | None, output_tokens: int, staged: int = 0) -> None:
        key = slo_class or ""
        n = self.seen[key] = self.seen.get(key, 0) + 1
        weight = max(1 / n, SMOOTHING)
        past = max(0, output_tokens - staged)
        self.means[key] = (1 - weight) * self.means.get(key, past) + weight * past


def expected_output(estimate: int, written: int, max_tokens: int) -> int:
    """Output tokens to plan for: the estimate, or twice what is written once it is outlived."""
    return min(max_tokens, max(estimate, 2 * written))
