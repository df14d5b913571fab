"""Do promises hold live? Half the requests with a tight TPOT, half with a loose one, one TTFT
for all, sent open loop (Poisson) to `slos-serve up` with one worker, as in issue 28. Each
request is judged by its own client-side token times; the gateway's `X-SLO-Promised` header
says whether it was promised or served best effort, and a 429 that it was refused. A policy
keeps its promises when every promised request meets its objectives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.live import run_live
from bench.validate import live_server
from bench.workloads import Arrival, Outcome, attainment
from shared.slo import DEFAULT_CLASSES


@dataclass(frozen=True)
class Load:
    rate: float  # requests per second
    count: int = 40
    tight_tpot_ms: float = 110.0
    loose_tpot_ms: float = 400.0
    ttft_ms: float = 3000.0
    output_tokens: int = 64
    prompt_tokens: tuple[int, int] = (64, 512)  # uniform in [low, high)
    seed: int = 0

    def arrivals(self) -> list[Arrival]:
        """Even ids tight (`t…`), odd ones loose (`l…`)."""
        rng = np.random.default_rng(self.seed)
        at = np.cumsum(rng.exponential(1.0 / self.rate, self.count))
        prompts = rng.integers(*self.prompt_tokens, self.count)
        return [Arrival(f"{'t' if i % 2 == 0 else 'l'}{i}", float(at[i]), int(prompts[i]), self.output_tokens, "chatbot",
                        ttft_ms=self.ttft_ms, tpot_ms=self.tight_tpot_ms if i % 2 == 0 else self.loose_tpot_ms)
                for i in range(self.count)]


@dataclass
class Run:
    policy: str
    load: Load
    outcomes: list[Outcome]
    step_fit: dict  # the worker's calibration at the end (`/admin/workers`)
    verdicts: dict[str, tuple[float, float]] = field(default_factory=dict)  # the gateway's, p50 and p99 bounds
    planner_promises: dict = field(default_factory=dict)  # the planner's own count, by its clock (`/admin/slo`)


    def row(self) -> dict[str, object]:
        """The figures of issue 28's table."""
        promised = [o for o in self.outcomes if o.promised]
        out: dict[str, object] = {
            "policy": self.policy, "rate": self.load.rate, "requests": len(self.outcomes),
            "promised": len(promised), "promised_met": sum(o.met for o in promised),
            "refused": sum(o.refused for o in self.outcomes),
            "best_effort": sum(o.promised is False for o in self.outcomes),
            "attainment": attainment(self.outcomes),
        }
        refusals = [o.verdict_s for o in self.outcomes if o.refused and o.verdict_s is not None]
        out["refusal_p50_ms"] = 1e3 * float(np.median(refusals)) if refusals else None
        out["refusal_p99_ms"] = 1e3 * float(np.quantile(refusals, 0.99)) if refusals else None
        for tier in "tl":
            tpots = [o.tpots_s[0] for o in self.outcomes
                     if o.request_id.startswith(tier) and o.tpots_s and o.tpots_s[0] is not None]
            name = "tight" if tier == "t" else "loose"
            out[f"{name}_met"] = sum(o.met for o in self.outcomes if o.request_id.startswith(tier))
            out[f"{name}_tpot_p50_ms"] = 1e3 * float(np.median(tpots)) if tpots else None
            out[f"{name}_tpot_p90_ms"] = 1e3 * float(np.quantile(tpots, 0.9)) if tpots else None
        return out


def run(model: Path, policy: str, load: Load, workdir: Path, vocab: int, worker_cpus: set[int] | None = None,
        profile: Path | None = None, front_cpus: set[int] | None = None) -> Run:
    """One policy at one load on a fresh server."""
    workdir.mkdir(parents=True, exist_ok=True)
    with live_server(model, profile, workdir / f"server-{policy}-{load.rate:g}.log", worker_cpus, policy,
                     front_cpus=front_cpus) as server:
        outcomes = run_live(server.url + "/v1", server.api_key, server.model, load.arrivals(), vocab, DEFAULT_CLASSES)
        fit = server.admin("/admin/workers")[0]["step_fit"]  # type: ignore[index]
        verdicts = verdict_bounds(httpx.get(server.url + "/metrics").text)
        counted = server.admin("/admin/slo")["promises"]  # type: ignore[index]
    return Run(policy, load, outcomes, fit, verdicts, counted)


def verdict_bounds(metrics: str) -> dict[str, tuple[float, float]]:
    """Per verdict, the upper bounds of the `slos_verdict_seconds` buckets holding its median and
    its 99th percentile: how long requests waited, from the gateway's receipt, for the planner's
    word (or the gateway's own refusal)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "slos_verdict_seconds_bucket":
                buckets.setdefault(sample.labels["verdict"], []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for verdict, b in buckets.items():
        b.sort()
        total = b[-1][1]
        if total:
            out[verdict] = tuple(next(le for le, n in b if n >= q * total) for q in (0.5, 0.99))
    return out
