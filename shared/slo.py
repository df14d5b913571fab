"""SLO types: named application classes and how a request's SLOs are resolved."""

from __future__ import annotations

import msgspec

from shared.messages import SLOSpec


class SLOTarget(msgspec.Struct, frozen=True):
    """Resolved objectives in milliseconds; None means the stage has no objective."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


DEFAULT_CLASSES: dict[str, SLOTarget] = {
    "chatbot": SLOTarget(ttft_ms=5000.0, tpot_ms=200.0),
    "coding": SLOTarget(ttft_ms=5000.0, tpot_ms=50.0),
    "summarization": SLOTarget(ttft_ms=1500.0, tpot_ms=200.0),
    "tool_calling": SLOTarget(ttft_ms=1000.0, tpot_ms=50.0),
    "reasoning": SLOTarget(ttft_ms=1000.0, tpot_ms=50.0),
    "best_effort": SLOTarget(),
}


class UnknownSLOClass(ValueError):
    pass


def resolve(spec: SLOSpec, classes: dict[str, SLOTarget]) -> SLOTarget:
    """Explicit per-request numbers override the class defaults field by field."""
    base = SLOTarget()
    if spec.slo_class is not None:
        if spec.slo_class not in classes:
            raise UnknownSLOClass(
                f"unknown slo_class {spec.slo_class!r}; known: {', '.join(sorted(classes))}"
            )
        base = classes[spec.slo_class]
    return SLOTarget(
        ttft_ms=spec.ttft_ms if spec.ttft_ms is not None else base.ttft_ms,
        tpot_ms=spec.tpot_ms if spec.tpot_ms is not None else base.tpot_ms,
    )
