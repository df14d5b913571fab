"""The paper's evaluation in the simulator: capacity of `slos` against baselines deployed with
their own knobs, on steady-state windows, over held-out seeds, against an upper bound.

The colocated policies run on `gpus` colocated workers; DistServe splits as many GPUs (two at
least) into a prefill and a decode pool. Capacities are compared per GPU. Workers that decode
propose speculative tokens by n-gram lookup, which costs no GPU time; `slos` chooses how many
each request verifies, a baseline verifies a fixed number (`Knobs.spec_len`: none as the
baselines are usually deployed, or a length `bench tune` may pick, as vLLM runs n-gram
speculation), and `slos`'s ablation without speculation shows what choosing is worth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np

from bench.bound import upper_bound
from bench.capacity import TARGET, Search, capacity
from bench.simulator import Cluster, simulate
from bench.workloads import Arrival, every_request, scenario, with_alpha
from planner.policies.base import Policy
from planner.policies.registry import PolicyConfig, make_policy
from shared.roofline import Batches, Profile
from shared.slo import DEFAULT_CLASSES

BASELINES = ("fcfs", "sarathi", "distserve")
GPU_MEMORY = 80e9
MEMORY_UTILISATION = 0.9
BLOCK_SIZE = 16
STEADY_S = 300.0  # a probe's window: this many seconds of arrivals...
STEADY_ARRIVALS = 2000  # ...and this many arrivals at least
SPEC_LENS = (0, 4)  # a baseline's speculative lengths `bench tune` tries: none, and n-gram at a usual length
T = TypeVar("T")


@dataclass(frozen=True)
class Knobs:
    """What a deployment of a policy sets; the baselines' are tuned per scenario (`bench tune`)."""

    budget: int | None = None  # tokens a step carries: Sarathi's and EDF's chunked budget, FCFS's and
    # DistServe's batched prompt tokens; None: as usually deployed (512 chunked, 4,096 batched)
    max_seqs: int = 256  # sequences a step holds at most
    prefill_gpus: int | None = None  # DistServe's prefill pool; None: half the GPUs
    spec_len: int = 0  # a baseline's fixed speculative length, as vLLM runs n-gram speculation; 0: none

    def config(self) -> PolicyConfig:
        return PolicyConfig(max_num_seqs=self.max_seqs, prefill_tokens=self.budget or 4096,
                            chunk_tokens=self.budget or 512, spec_len=self.spec_len)

    def label(self) -> str:
        parts = [f"budget {self.budget}"] if self.budget else []
        parts += [f"{self.max_seqs} seqs"] if self.max_seqs != 256 else []
        parts += [f"{self.prefill_gpus} prefill GPUs"] if self.prefill_gpus else []
        parts += [f"k {self.spec_len}"] if self.spec_len else []
        return ", ".join(parts) or "defaults"


@dataclass(frozen=True)
class Setup:
    make: Callable[[], Policy]
    cluster: Cluster

    @property
    def gpus(self) -> int:
        c = self.cluster
        return c.prefill + c.decode if c.prefill else c.colocated


@dataclass(frozen=True)
class Window:
    """How much of a scenario one probe simulates: `seconds` of arrivals, and `arrivals` at least."""

    seconds: float = STEADY_S
    arrivals: int = STEADY_ARRIVALS

    def at(self, rate: float) -> float:
        return max(self.seconds, self.arrivals / rate) if rate > 0 else self.seconds


@dataclass(frozen=True)
class Variant:
    """Which form of a scenario a probe runs: bursty or steady arrivals, an acceptance of
    speculative tokens for every request instead of the scenario's (the sensitivity table),
    and whose objectives."""

    bursty: bool = False
    acceptance: float | None = None
    objectives: str = "ours"  # or "paper" (`bench.workloads.OBJECTIVES`)

    def arrivals(self, name: str, profile: Profile, rate: float, seconds: float, seed: int) -> list[Arrival]:
        arrivals = scenario(name, profile, rate, seconds, seed, self.bursty, self.objectives)
        return arrivals if self.acceptance is None else [with_alpha(a, self.acceptance) for a in arrivals]


def kv_blocks(profile: Profile, block_size: int = BLOCK_SIZE) -> int:
    """KV blocks one GPU holds beside the weights."""
    free = GPU_MEMORY * MEMORY_UTILISATION - profile.model.weight_bytes
    return int(free // (profile.model.kv_bytes_per_token * block_size))


def setup(policy: str, profile: Profile, gpus: int, knobs: Knobs = Knobs()) -> Setup:
    """The named policy (or ablation) on `gpus` GPUs, deployed with `knobs`."""
    blocks = kv_blocks(profile)
    if policy == "distserve":
        total = max(2, gpus)
        prefill = min(total - 1, max(1, knobs.prefill_gpus or total // 2))
        cluster = Cluster(profile, blocks, prefill=prefill, decode=total - prefill, speculator="ngram")
    else:
        cluster = Cluster(profile, blocks, colocated=gpus, speculator="ngram")
    return Setup(partial(make_policy, policy, knobs.config(), profile), cluster)


def sarathi_budget(profile: Profile, tpot_s: float) -> int:
    """Sarathi-Serve's own rule: the largest token budget whose step, a full chunk of prompt,
    fits in the tightest TBT (TPOT) target."""
    lo, hi = 0, 1 << 16
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step = profile.predict(Batches.of(prefill_tokens=mid, num_seqs=1, kv_read=mid, attention_pairs=mid * mid / 2))
        lo, hi = (mid, hi) if float(step) <= tpot_s else (lo, mid)
    return max(lo, 16)


def tightest_tpot_s(name: str, profile: Profile, seed: int) -> float:
    """The TPOT that 5 % of a scenario's requests (any stage) are at or under."""
    tpots = []
    for a in every_request(scenario(name, profile, 5.0, 120.0, seed)):
        tpots += [a.tpot_ms] if a.tpot_ms else [s.tpot_ms for s in a.stages if s.tpot_ms]
    return float(np.percentile(tpots, 5)) / 1e3


def search(s: Setup, name: str, profile: Profile, window: Window, variant: Variant, start: float, seed: int = 0,
           splits: int = 4) -> Search:
    """The capacity of one policy on one scenario (for the whole cluster, not per GPU)."""
    def attainment_at(rate: float) -> float:
        arrivals = variant.arrivals(name, profile, rate, window.at(rate), seed)
        return simulate(s.make(), s.cluster, arrivals, DEFAULT_CLASSES, seed=seed, stop_below=TARGET).attainment

    return capacity(attainment_at, start, splits=splits)


def bound(name: str, profile: Profile, window: Window, variant: Variant, seed: int = 0) -> float:
    """The scenario's upper bound per GPU (`bench.bound`), on one window's requests."""
    arrivals = variant.arrivals(name, profile, 10.0, window.at(10.0), seed)
    return upper_bound(profile, arrivals, kv_blocks(profile) * BLOCK_SIZE)


def geomean(values: list[float]) -> float:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return float(np.exp(np.mean(np.log(positive)))) if positive else math.nan


# Student's t at 97.5 % for 1-10 degrees of freedom; beyond, the value at 11 (to 30) or at 30, never
# below the true one, so intervals are if anything too wide
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % confidence interval (Student's t) of independent measurements."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    df = len(v) - 1
    t = T_975[df - 1] if df <= len(T_975) else 2.201 if df <= 30 else 2.042
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


@dataclass
class CapacityRow:
    """One scenario's capacities per GPU on each seed, each policy's probes on the first seed,
    and its upper bound."""

    scenario: str
    capacity: dict[str, list[float]]  # policy -> requests (tool calling: tasks) per second per GPU, per seed
    probes: dict[str, list[tuple[float, float]]]  # policy -> (rate per GPU, attainment), first seed
    bound: float  # per GPU

    def mean(self, policy: str) -> float:
        return float(np.mean(self.capacity[policy])) if policy in self.capacity else math.nan

    @property
    def best_baseline(self) -> str | None:
        """The baseline with the highest mean capacity."""
        run = [b for b in BASELINES if b in self.capacity]
        return max(run, key=self.mean) if run else None

    def ratios(self, policy: str = "slos", against: str | None = None) -> list[float]:
        """`policy` ÷ `against` (default: the best baseline), seed by seed."""
        other = against or self.best_baseline
        if other is None or policy not in self.capacity or other not in self.capacity:
            return []
        return [a / b if b else math.inf for a, b in zip(self.capacity[policy], self.capacity[other])]


def capacity_per_gpu(policy: str, knobs: Knobs, profile: Profile, gpus: int, name: str, window: Window,
                     variant: Variant, start: float, seed: int, splits: int) -> tuple[float, list[tuple[float, float]]]:
    """One policy's capacity per GPU on one scenario and seed, and its probes (rate per GPU,
    attainment); `start` is the first rate per GPU."""
    s = setup(policy, profile, gpus, knobs)
    found = search(s, name, profile, window, variant, start * s.gpus, seed, splits)
    return found.capacity / s.gpus, [(r / s.gpus, a) for r, a in found.probes]


def run_parallel(fn: Callable[..., T], calls: list[tuple], jobs: int,
                 done: Callable[[], None] = lambda: None) -> list[T]:
    """`fn(*args)` for each args in `calls`, on `jobs` processes (in this one for 1), in order."""
    if jobs <= 1:
        out = []
        for args in calls:
            out.append(fn(*args))
            done()
        return out
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for f in as_completed(futures):
            f.result()
            done()
        return [f.result() for f in futures]


def capacity_row(name: str, policies: list[str], profile: Profile, gpus: int, window: Window, variant: Variant,
                 start: float, splits: int, seeds: list[int], knobs: dict[str, Knobs] | None = None, jobs: int = 1,
                 done: Callable[[], None] = lambda: None) -> CapacityRow:
    """Search each policy's capacity on one scenario for every seed, on `jobs` processes."""
    knobs = knobs or {}
    calls = [(p, knobs.get(p, Knobs()), profile, gpus, name, window, variant, start, seed, splits)
             for p in policies for seed in seeds]
    results = iter(run_parallel(capacity_per_gpu, calls, jobs, done))
    capacities: dict[str, list[float]] = {}
    probes = {}
    for policy in policies:
        for seed in seeds:
            cap, tried = next(results)
            capacities.setdefault(policy, []).append(cap)
            probes.setdefault(policy, tried)
    return CapacityRow(name, capacities, probes, bound(name, profile, window, variant, seeds[0]))


def knob_grid(policy: str, profile: Profile, gpus: int, tpot_s: float, quick: bool = False) -> list[Knobs]:
    """What `bench tune` tries for a baseline: token budgets 64-4,096 (and Sarathi-Serve's rule
    for the chunked ones), FCFS's sequences, DistServe's every split; each without speculation
    and with vLLM's n-gram speculation at a fixed length (`SPEC_LENS`), which the workers offer
    every policy."""
    if policy not in (*BASELINES, "edf"):  # nothing to tune: slos chooses its own batches and speculation
        return [Knobs()]
    rule = sarathi_budget(profile, tpot_s)
    if quick:  # the rule and the usual deployment
        grid = {"sarathi": [Knobs(budget=rule), Knobs(budget=512)], "edf": [Knobs(budget=rule), Knobs(budget=512)],
                "fcfs": [Knobs(budget=2048), Knobs(budget=8192)]}.get(policy, [Knobs()])  # DistServe: half and half
    else:
        budgets = [64, 128, 256, 512, 1024, 2048, 4096]
        match policy:
            case "sarathi" | "edf":
                grid = [Knobs(budget=b) for b in sorted(set(budgets) | {rule})]
            case "fcfs":
                grid = [Knobs(budget=b, max_seqs=n) for b in budgets if b >= 512 for n in (64, 256)]
                grid.append(Knobs(budget=8192))
            case "distserve":
                grid = [Knobs(budget=b, prefill_gpus=p) for p in range(1, max(2, gpus)) for b in budgets if b >= 512]
    return [dataclasses.replace(k, spec_len=n) for k in grid for n in SPEC_LENS]

