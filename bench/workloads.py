"""Workloads: requests with arrival times, lengths and objectives, and how each one fared.

The simulator (`bench.simulator`) and the live load generator (`bench.live`) take the same
workloads and report the same outcomes, judged by `shared.slo.Tracker`, so a scenario can be
run both ways and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import Stage


@dataclass(frozen=True)
class Arrival:
    """One request of a workload."""

    request_id: str
    at: float  # arrival time; for a follow-up, the think time after its predecessor finished
    prompt_tokens: int
    output_tokens: int  # what it writes before it stops
    slo_class: str
    ttft_ms: float | None = None  # overrides the class's objectives when set
    tpot_ms: float | None = None
    stages: tuple[Stage, ...] = ()
    max_tokens: int | None = None  # the client's cap; None: the output length is known to nobody
    alpha: float = 0.0  # per-token acceptance of speculative proposals for this request
    then: Arrival | None = None  # the next call of a tool loop


@dataclass
class Outcome:
    request_id: str
    slo_class: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    refused: bool
    finished: bool
    met: bool
    ttft_s: float | None
    tpots_s: list[float | None]


def attainment(outcomes: list[Outcome]) -> float:
    """Share of requests that met all their SLOs (refused and unfinished ones did not)."""
    return sum(o.met for o in outcomes) / max(1, len(outcomes))


def attainment_by_class(outcomes: list[Outcome]) -> dict[str, float]:
    return {c: attainment([o for o in outcomes if o.slo_class == c]) for c in sorted({o.slo_class for o in outcomes})}
