"""Capacity: the highest arrival rate at which at least 90 % of requests meet all their SLOs.

Found by bisection on a log scale over simulated runs of a scenario (deterministic given the
seed): double or halve from a starting rate until the target is bracketed, then split the
bracket. Every probe is kept, so the same search also draws attainment-against-rate curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

TARGET = 0.9


@dataclass
class Search:
    capacity: float  # req/s; 0 when even the lowest rate tried misses the target
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment), in rate order


def capacity(attainment_at: Callable[[float], float], start: float, target: float = TARGET,
             splits: int = 6, max_doublings: int = 8) -> Search:
    probes: dict[float, float] = {}

    def probe(rate: float) -> float:
        if rate not in probes:
            probes[rate] = attainment_at(rate)
        return probes[rate]

    lo = hi = start
    if probe(start) >= target:
        for _ in range(max_doublings):
            hi *= 2
            if probe(hi) < target:
                break
            lo = hi
        else:
            return Search(lo, sorted(probes.items()))
    else:
        for _ in range(max_doublings):
            lo /= 2
            if probe(lo) >= target:
                break
            hi = lo
        else:
            return Search(0.0, sorted(probes.items()))
    for _ in range(splits):
        mid = math.sqrt(lo * hi)
        if probe(mid) >= target:
            lo = mid
        else:
            hi = mid
    return Search(lo, sorted(probes.items()))
