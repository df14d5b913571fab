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

import numpy as np

from bench.capacity import TARGET, Search, capacity
from bench.simulator import Cluster, simulate
from bench.workloads import Arrival, every_request, scenario
from planner.policies import Policy
from planner.policies.edf import EDFPolicy
from planner.policies.fcfs import DistServePolicy, FCFSPolicy
from planner.policies.sarathi import SarathiPolicy
from planner.policies.slos import SLOPolicy
from shared.roofline import Profile
from shared.slo import DEFAULT_CLASSES

BASELINES = ("fcfs", "sarathi", "distserve")
MAX_NUM_SEQS = 256
CHUNK_TOKENS = 512  # Sarathi's and EDF's fixed token budget per step
PREFILL_CAP = 4096  # FCFS's and DistServe's batched prefill tokens
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
    return {
        "slos": Setup(lambda: SLOPolicy(profile, max_num_seqs=MAX_NUM_SEQS), colocated),
        "fcfs": Setup(lambda: FCFSPolicy(max_batch_tokens=PREFILL_CAP, max_num_seqs=MAX_NUM_SEQS), colocated),
        "sarathi": Setup(lambda: SarathiPolicy(max_batch_tokens=CHUNK_TOKENS, max_num_seqs=MAX_NUM_SEQS), colocated),
        "distserve": Setup(lambda: DistServePolicy(max_batch_tokens=PREFILL_CAP, max_num_seqs=MAX_NUM_SEQS), split),
        "edf": Setup(lambda: EDFPolicy(profile, max_batch_tokens=CHUNK_TOKENS, max_num_seqs=MAX_NUM_SEQS), colocated),
        "slos-no-spec": Setup(lambda: SLOPolicy(profile, max_num_seqs=MAX_NUM_SEQS, max_spec_len=0), colocated),
        "slos-no-routing": Setup(lambda: SLOPolicy(profile, max_num_seqs=MAX_NUM_SEQS, routing=False), colocated),
        "slos-no-burst": Setup(lambda: SLOPolicy(profile, max_num_seqs=MAX_NUM_SEQS, best_effort_limit=0), colocated),
    }


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
