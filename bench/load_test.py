"""`slos-serve bench live`: a scenario replayed against any OpenAI-compatible endpoint, judged
from the client's side.

Attainment comes from the token arrival times the client sees (`bench.live`), so it means
the same against our gateway, real vLLM or anything else; a server that ignores the SLO
fields is judged by the same objectives. The objectives scale with a profile's idle
latencies (`bench.workloads.with_slos`), one profile for every server compared, so that all
are held to the same numbers. Where the endpoint is ours and the planner's admin token is
given, the run also reports how long workers waited for their orders while their requests
went on (the planner's and the bus's share of the critical path), and, on the idle server
before the load, what a one-token request costs beyond its step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.capacity import Search, capacity
from bench.live import Seen, run_live
from bench.workloads import Arrival, Outcome, attainment, scenario, within_context
from shared.roofline import Profile
from shared.slo import DEFAULT_CLASSES

PERCENTILES = (50, 90, 99)
PROBES = 20  # one-token requests, one after another, that measure the idle cost beyond the step
SETTLE_S = 0.2  # for the planner to take the step's report after the client has its token


@dataclass
class Endpoint:
    """Where the load goes: the OpenAI base URL (ending in /v1) and, for our servers, the
    planner's admin API."""

    url: str
    api_key: str
    model: str
    max_model_len: int | None = None
    admin_url: str | None = None
    admin_token: str | None = None

    def workers(self) -> list[dict]:
        """The planner's per-worker counters, or none where the admin API is not ours to read."""
        if self.admin_url is None:
            return []
        r = httpx.get(self.admin_url.rstrip("/") + "/admin/workers",
                      headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=10)
        r.raise_for_status()
        return r.json()


def discover(url: str, api_key: str, model: str | None = None, admin_url: str | None = None,
             admin_token: str | None = None) -> Endpoint:
    """The endpoint's model (the named one, or the first it lists) and its context window, where
    its model list says (ours and vLLM's do)."""
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    r = httpx.get(base + "/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    r.raise_for_status()
    models = r.json()["data"]
    entry = next((m for m in models if m["id"] == model), None) if model else models[0]
    if entry is None:
        raise ValueError(f"{url} serves {', '.join(m['id'] for m in models)}, not {model}")
    return Endpoint(base, api_key, entry["id"], entry.get("max_model_len"), admin_url, admin_token)


@dataclass
class Latencies:
    """One class's requests (or all of them) and how they fared."""

    requests: int
    refused: int
    finished: int
    met: int
    ttft_ms: dict[int, float]  # percentile -> ms, over finished requests
    tpot_ms: dict[int, float]  # of each finished request's slowest stage

    @property
    def attainment(self) -> float:
        return self.met / max(1, self.requests)


def latencies(outcomes: list[Outcome]) -> Latencies:
    done = [o for o in outcomes if o.finished]
    ttft = [o.ttft_s * 1e3 for o in done if o.ttft_s is not None]
    tpot = [max(t for t in o.tpots_s if t is not None) * 1e3 for o in done if any(t is not None for t in o.tpots_s)]

    def pct(xs: list[float]) -> dict[int, float]:
        return {p: float(np.percentile(xs, p)) for p in PERCENTILES} if xs else {p: math.nan for p in PERCENTILES}

    return Latencies(len(outcomes), sum(o.refused for o in outcomes), len(done), sum(o.met for o in outcomes),
                     pct(ttft), pct(tpot))


@dataclass
class WorkerTime:
    """Time workers ran steps and waited for orders while their requests went on, over a run."""

    busy_s: float
    waited_s: float

    @property
    def idle_share(self) -> float:
        """Waiting as a share of step time."""
        return self.waited_s / self.busy_s if self.busy_s else math.nan


def worker_time(before: list[dict], after: list[dict]) -> WorkerTime | None:
    if not after:
        return None
    start = {w["worker_id"]: w for w in before}

    def grew(key: str) -> float:
        return sum(w[key] - start.get(w["worker_id"], {}).get(key, 0.0) for w in after)

    return WorkerTime(grew("busy_s"), grew("waited_s"))


@dataclass
class Run:
    """One rate's run."""

    rate: float
    duration_s: float
    wall_s: float
    outcomes: list[Outcome]
    overall: Latencies
    by_class: dict[str, Latencies]
    output_tokens: int
    workers: WorkerTime | None = None

    @property
    def goodput(self) -> float:
        """Requests per second that met all their objectives."""
        return self.overall.met / self.duration_s


def summarize(rate: float, duration_s: float, wall_s: float, outcomes: list[Outcome],
              workers: WorkerTime | None = None) -> Run:
    classes = sorted({o.slo_class for o in outcomes})
    return Run(rate, duration_s, wall_s, outcomes, latencies(outcomes),
               {c: latencies([o for o in outcomes if o.slo_class == c]) for c in classes},
               sum(o.output_tokens for o in outcomes), workers)


def workload(name: str, profile: Profile, rate: float, duration_s: float, seed: int, bursty: bool,
             max_model_len: int | None, max_requests: int | None = None) -> list[Arrival]:
    """The scenario's arrivals, clipped to the context window and to `max_requests` first arrivals."""
    arrivals = scenario(name, profile, rate, duration_s, seed, bursty)
    arrivals = within_context(arrivals, max_model_len) if max_model_len else arrivals
    return arrivals[:max_requests] if max_requests else arrivals


def run_at(endpoint: Endpoint, arrivals: list[Arrival], rate: float, duration_s: float, vocab: int,
           seen: Seen = lambda outcome: None, timeout_s: float = 600.0) -> Run:
    before = endpoint.workers()
    started = time.monotonic()
    outcomes = run_live(endpoint.url, endpoint.api_key, endpoint.model, arrivals, vocab, DEFAULT_CLASSES, timeout_s,
                        seen)
    wall = time.monotonic() - started
    return summarize(rate, duration_s, wall, outcomes, worker_time(before, endpoint.workers()))


def search(attainment_at: Callable[[float], Run], start: float, splits: int) -> tuple[Search, list[Run]]:
    """The rate at 90 % attainment, by the simulator's search (`bench.capacity`), every probe kept."""
    runs: list[Run] = []

    def probe(rate: float) -> float:
        runs.append(attainment_at(rate))
        return attainment(runs[-1].outcomes)

    found = capacity(probe, start=start, splits=splits)
    return found, sorted(runs, key=lambda r: r.rate)


@dataclass
class IdleCost:
    """On the idle server: one-token requests' time to first token, and what is left of it after
    the worker's step (HTTP, the gateway, the planner, the bus, both ways)."""

    ttft_ms: float
    beyond_step_ms: float | None = None  # None where the worker's step time is not ours to read


def idle_cost(endpoint: Endpoint, vocab: int, probes: int = PROBES) -> IdleCost:
    ttfts, beyond = [], []
    for i in range(probes):
        before = endpoint.workers()
        arrival = Arrival(f"probe{i}", 0.0, 1, 1, "chatbot")
        (o,) = run_live(endpoint.url, endpoint.api_key, endpoint.model, [arrival], vocab, DEFAULT_CLASSES)
        if o.ttft_s is None:
            continue
        ttfts.append(o.ttft_s)
        time.sleep(SETTLE_S)
        spent = worker_time(before, endpoint.workers())
        if spent is not None:
            beyond.append(o.ttft_s - spent.busy_s)
    return IdleCost(float(np.median(ttfts)) * 1e3 if ttfts else math.nan,
                    float(np.median(beyond)) * 1e3 if beyond else None)


@dataclass
class Report:
    """Everything a `bench live` run found, as written to its JSON file."""

    endpoint: str
    model: str
    scenario: str
    profile: str
    seed: int
    runs: list[Run]
    capacity: float | None = None  # req/s at 90 % attainment, when searched
    idle: IdleCost | None = None
    machine: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for run, raw in zip(self.runs, out["runs"]):
            raw["goodput"] = run.goodput
            raw["attainment"] = run.overall.attainment
            raw["idle_share"] = run.workers.idle_share if run.workers else None
        return out


def save(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1, default=str))
