"""How many tokens a request will write, when all the planner knows is its class.

Each class starts from its configured typical length and then follows the lengths of its
finished requests (an exponential average, so it tracks a workload that changes). A request
that outlives its estimate is re-estimated at twice what it has written so far, capped by its
`max_tokens`: the plan grows with it instead of trusting a number already proven wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_OUTPUT_TOKENS = 256
SMOOTHING = 0.05  # weight of one finished request, once a class has seen 1 / SMOOTHING of them


@dataclass
class LengthModel:
    typical: dict[str, int] = field(default_factory=dict)  # configured, per class
    means: dict[str, float] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def estimate(self, slo_class: str | None) -> int:
        key = slo_class or ""
        if key in self.means:
            return max(1, round(self.means[key]))
        return self.typical.get(key, DEFAULT_OUTPUT_TOKENS)

    def observe(self, slo_class: str | None, output_tokens: int) -> None:
        key = slo_class or ""
        n = self.seen[key] = self.seen.get(key, 0) + 1
        weight = max(1 / n, SMOOTHING)
        self.means[key] = (1 - weight) * self.means.get(key, output_tokens) + weight * output_tokens


def expected_output(estimate: int, written: int, max_tokens: int) -> int:
    """Output tokens to plan for: the estimate, or twice what is written once it is outlived."""
    return min(max_tokens, max(estimate, 2 * written))
