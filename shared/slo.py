"""SLO types: named application classes, how a request's SLOs are resolved, and how a
request's token times are judged against them.

A request has a TTFT objective for its first token and, for the tokens after it, one TPOT
objective or a list of stages (e.g. thinking at a tight TPOT, then answering at a loose one).
A stage's TPOT is the mean gap between consecutive tokens inside it: the gap before token j
belongs to the stage holding token j. The planner, the simulator and the benchmarks all judge
with `Tracker`, so "met its SLOs" means the same everywhere.
"""

from __future__ import annotations

import bisect
import math
from array import array
from dataclasses import dataclass, field

import msgspec

from shared.messages import SLOSpec, Stage


class SLOTarget(msgspec.Struct, frozen=True, gc=False):
    """Resolved objectives in milliseconds; None means no objective."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    stages: tuple[Stage, ...] = ()

    def has_objectives(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None or any(s.tpot_ms is not None for s in self.stages)

    def segments(self) -> list[tuple[int, float | None]]:
        """(first output token index past the segment, TPOT ms) for each stage; the last
        segment runs to the end of the output."""
        out: list[tuple[int, float | None]] = []
        end = 0
        for stage in self.stages:
            if stage.tokens is None:
                return [*out, (1 << 62, stage.tpot_ms)]
            end += stage.tokens
            out.append((end, stage.tpot_ms))
        return [*out, (1 << 62, self.tpot_ms)]

    def staged_tokens(self) -> int:
        """Output tokens its stages of a given length cover: a request that sets a thinking
        stage of N tokens says it will write at least that many."""
        return sum(stage.tokens for stage in self.stages if stage.tokens is not None)

    def tpot_at(self, index: int) -> float | None:
        """The TPOT objective (ms) of output token `index`."""
        for end, tpot in self.segments():
            if index < end:
                return tpot
        return self.tpot_ms


class SLOClass(msgspec.Struct, frozen=True):
    """A named application class: its objectives and how many tokens it usually writes (what
    the planner assumes until it has seen the class's requests finish)."""

    target: SLOTarget
    output_tokens: int = 256


DEFAULT_CLASSES: dict[str, SLOClass] = {
    "chatbot": SLOClass(SLOTarget(ttft_ms=5000.0, tpot_ms=200.0), 256),
    "coding": SLOClass(SLOTarget(ttft_ms=5000.0, tpot_ms=50.0), 256),
    "summarization": SLOClass(SLOTarget(ttft_ms=1500.0, tpot_ms=200.0), 128),
    "tool_calling": SLOClass(SLOTarget(ttft_ms=1000.0, tpot_ms=50.0), 64),
    "reasoning": SLOClass(SLOTarget(ttft_ms=1000.0, tpot_ms=200.0, stages=(Stage(512, 50.0),)), 768),
    "best_effort": SLOClass(SLOTarget(), 256),
}


class UnknownSLOClass(ValueError):
    pass


def with_default_class(spec: SLOSpec, default_class: str | None) -> SLOSpec:
    """A request that names no class and no objectives gets the operator's default class, if
    one is set (`Settings.default_slo_class`); otherwise it stays best effort."""
    if default_class is None or spec.slo_class is not None or spec.ttft_ms is not None \
            or spec.tpot_ms is not None or spec.stages:
        return spec
    return msgspec.structs.replace(spec, slo_class=default_class)


def resolve(spec: SLOSpec, classes: dict[str, SLOClass]) -> SLOTarget:
    """Explicit per-request numbers override the class defaults field by field."""
    base = SLOTarget()
    if spec.slo_class is not None:
        if spec.slo_class not in classes:
            raise UnknownSLOClass(
                f"unknown slo_class {spec.slo_class!r}; known: {', '.join(sorted(classes))}"
            )
        base = classes[spec.slo_class].target
    return SLOTarget(
        ttft_ms=spec.ttft_ms if spec.ttft_ms is not None else base.ttft_ms,
        tpot_ms=spec.tpot_ms if spec.tpot_ms is not None else base.tpot_ms,
        stages=tuple(spec.stages) if spec.stages else (() if spec.tpot_ms is not None else base.stages),
    )


@dataclass
class Tracker:
    """One request's token times, kept as sums per stage so that it costs O(stages) memory."""

    slo: SLOTarget
    arrival: float
    resumed: bool = False  # its first token was delivered before (a resubmission): no TTFT to judge
    first_at: float | None = None
    last_at: float | None = None
    tokens: int = 0
    gap_sum: array = field(default_factory=lambda: array("d"))  # arrays: no work for the garbage collector
    gap_count: array = field(default_factory=lambda: array("q"))

    def __post_init__(self) -> None:
        self._ends, self._tpots_ms = zip(*self.slo.segments())
        self.gap_sum = array("d", [0.0] * len(self._ends))
        self.gap_count = array("q", [0] * len(self._ends))

    def add(self, n: int, at: float) -> None:
        """`n` tokens arrived together at time `at`: the first of them waited since the last
        token, the rest came with it."""
        if n <= 0:
            return
        if n == 1 and self.last_at is not None and 0 < self.tokens < self._ends[0]:  # the common case
            self.gap_count[0] += 1
            self.gap_sum[0] += at - self.last_at
            self.last_at = at
            self.tokens += 1
            return
        j = self.tokens
        if j == 0:
            self.first_at = at
            j += 1
        end = self.tokens + n
        stage = 0
        while j < end:
            while j >= self._ends[stage]:
                stage += 1
            upto = min(end, self._ends[stage])
            self.gap_count[stage] += upto - j
            if j == self.tokens:
                self.gap_sum[stage] += at - (self.last_at if self.last_at is not None else at)
            j = upto
        self.last_at = at
        self.tokens = end

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.arrival

    def stage_tpots_s(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.gap_sum, self.gap_count)]

    def met(self) -> bool:
        """Did the tokens so far meet every objective?"""
        if self.tokens == 0:
            return False
        ttft = self.slo.ttft_ms
        if not self.resumed and ttft is not None and self.ttft_s is not None and self.ttft_s > ttft / 1e3:
            return False
        for (_, tpot), got in zip(self.slo.segments(), self.stage_tpots_s()):
            if tpot is not None and got is not None and got > tpot / 1e3 + 1e-9:
                return False
        return True

    def lag_s(self) -> float:
        """Seconds by which the current stage's gaps so far run over its TPOT (negative: ahead of
        it; 0 without one): what the stage's next tokens have to make up."""
        stage = min(bisect.bisect_right(self._ends, self.tokens), len(self._ends) - 1)
        tpot = self._tpots_ms[stage]
        return 0.0 if tpot is None else self.gap_sum[stage] - self.gap_count[stage] * tpot / 1e3

    def deadline(self) -> float:
        """When the first token is due; inf without a TTFT objective or once it has come."""
        if self.slo.ttft_ms is None or self.resumed or self.first_at is not None:
            return math.inf
        return self.arrival + self.slo.ttft_ms / 1e3
