"""The paper's evaluation in the simulator: capacity of `slos` against the baselines per
scenario, ablations, replica scaling, and a roofline upper bound.

The colocated policies run on `gpus` colocated workers; DistServe splits as many GPUs (two at
least) into prefill and decode pools, half each. Capacities are compared per GPU. Workers that
decode propose speculative tokens by n-gram lookup, which costs no GPU time; only `slos`
orders any (the baselines run as they are usually deployed, without speculation), and its
ablation without speculation shows what that is worth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from bench.capacity import TARGET, Search, capacity
from bench.simulator import Cluster, simulate
from bench.workloads import Arrival, every_request, scenario
from planner.policies.base import Policy
from planner.policies.registry import ALL_NAMES, PolicyConfig, make_policy
from shared.roofline import Profile
from shared.slo import DEFAULT_CLASSES

BASELINES = ("fcfs", "sarathi", "distserve")
# as each policy is usually deployed on a GPU: Sarathi's and EDF's fixed token budget per step,
# FCFS's and DistServe's batched prefill tokens
GPU_CONFIG = PolicyConfig(max_num_seqs=256, prefill_tokens=4096, chunk_tokens=512)
GPU_MEMORY = 80e9
MEMORY_UTILISATION = 0.9


@dataclass(frozen=True)
class Setup:
    make: Callable[[], Policy]
    cluster: Cluster

    @property
    def gpus(self) -> int:
        c = self.cluster
        return c.prefill + c.decode if c.prefill else c.colocated


def kv_blocks(profile: Profile, block_size: int = 16) -> int:
    """KV blocks one GPU holds beside the weights."""
    free = GPU_MEMORY * MEMORY_UTILISATION - profile.model.weight_bytes
    return int(free // (profile.model.kv_bytes_per_token * block_size))


def setups(profile: Profile, gpus: int) -> dict[str, Setup]:
    blocks = kv_blocks(profile)
    colocated = Cluster(profile, blocks, colocated=gpus, speculator="ngram")
    split = Cluster(profile, blocks, prefill=max(1, gpus // 2), decode=max(1, gpus - gpus // 2))  # two at least
    return {name: Setup(partial(make_policy, name, GPU_CONFIG, profile), split if name == "distserve" else colocated)
            for name in ALL_NAMES}


def search(setup: Setup, name: str, profile: Profile, duration_s: float, bursty: bool, start: float,
           seed: int = 0, splits: int = 4) -> Search:
    """The capacity of one policy on one scenario (for the whole cluster, not per GPU)."""
    def attainment_at(rate: float) -> float:
        arrivals = scenario(name, profile, rate, duration_s, seed, bursty)
        return simulate(setup.make(), setup.cluster, arrivals, DEFAULT_CLASSES, seed=seed, stop_below=TARGET).attainment

    return capacity(attainment_at, start, splits=splits)


def roofline_bound(profile: Profile, arrivals: list[Arrival], gpus: int) -> float:
    """Arrivals per second (tool calling: whole loops) all GPUs could finish if every FLOP ran
    at the profile's effective peak and nothing else cost anything: no policy can sustain more."""
    model = profile.model
    flops = 0.0
    for a in every_request(arrivals):
        p, o = a.prompt_tokens, a.output_tokens
        attention = (p * p / 2 + o * (p + o / 2)) * model.flops_per_pair
        flops += (p + o) * model.flops_per_token + attention
    return gpus / (flops / len(arrivals) * profile.params.inv_flops)


def geomean(values: list[float]) -> float:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return float(np.exp(np.mean(np.log(positive)))) if positive else math.nan


@dataclass
class CapacityRow:
    """One scenario's capacities per GPU, each policy's probes, and the ratios the paper reports."""

    scenario: str
    capacity: dict[str, float]  # policy -> requests (tool calling: tasks) per second per GPU
    probes: dict[str, list[tuple[float, float]]]  # policy -> (rate per GPU, attainment)
    bound: float  # the roofline bound per GPU

    @property
    def best_baseline(self) -> float:
        return max((self.capacity[b] for b in BASELINES if b in self.capacity), default=math.nan)

    def ratios(self) -> tuple[float, float, float]:
        """slos ÷ the best baseline, slos ÷ EDF, bound ÷ the best baseline; nan where a policy
        they need was not run."""
        best, slos, edf = self.best_baseline, self.capacity.get("slos", math.nan), self.capacity.get("edf", math.nan)
        return (slos / best if best else math.inf, slos / edf if edf else math.inf,
                self.bound / best if best else math.inf)


def capacity_row(name: str, policies: list[str], profile: Profile, gpus: int, duration_s: float, bursty: bool,
                 start: float, splits: int) -> CapacityRow:
    """Search each policy's capacity on one scenario; `start` is the first rate per GPU."""
    by_policy = setups(profile, gpus)
    capacity, probes = {}, {}
    for policy in policies:
        setup = by_policy[policy]
        found = search(setup, name, profile, duration_s, bursty, start * setup.gpus, splits=splits)
        capacity[policy] = found.capacity / setup.gpus
        probes[policy] = [(r / setup.gpus, a) for r, a in found.probes]
    bound = roofline_bound(profile, scenario(name, profile, 1.0, duration_s, 0, bursty), 1)
    return CapacityRow(name, capacity, probes, bound)

