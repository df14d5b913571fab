"""An upper bound on the capacity of any policy: the rate of arrivals at which the GPUs could
not serve 90 % of the requests even as a fluid, with no queueing, no deadlines and perfect
packing of every step.

It prices what every request makes the simulated workers do (`bench.simulator`) from below,
with the same roofline as the simulator:
- compute: each prompt token and each output token after the first runs through the model
  once at least, plus its attention to the tokens before it;
- memory traffic: each step reads the weights and the KV of every sequence in it. A request
  reads its context once per step it decodes in; speculation lets a step write several
  tokens, but with a per-token acceptance a, a step writes 1 / (1 - a) tokens at most on
  average, so a request writing d tokens decodes in d (1 - a) steps at least (in expectation,
  whatever lengths are proposed). A step reads at most one worker's KV cache, so a worker
  that reads R tokens of KV runs R / capacity steps at least, each reading the weights;
- fixed costs per step and per sequence, where the profile has them.
Steps add up their compute and memory (or take the larger, as the profile combines them), so
the GPU time of serving a set of requests is at least the sum of their compute or of their
memory times. A policy needs 90 % of the requests met; the bound lets it pick the cheapest
90 % on each resource. TTFTs and TPOTs only constrain when work is done, never how much, so
they are left out: that keeps it a bound and makes it looser.

The bound is in expectation over the speculative draws and holds for long windows (steady
state): a finite window also has the time after its last arrival.
"""

from __future__ import annotations

import math

import numpy as np

from bench.capacity import TARGET
from bench.workloads import Arrival, every_request
from shared.roofline import Profile


def request_costs(profile: Profile, arrivals: list[Arrival], kv_tokens: int) -> tuple[np.ndarray, ...]:
    """Seconds of (fixed cost, compute, memory traffic) that serving each request takes at
    least, on workers holding `kv_tokens` of KV cache each; one entry per request."""
    model, p = profile.model, profile.params
    requests = every_request(arrivals)
    prompt = np.array([a.prompt_tokens for a in requests], dtype=np.float64)
    decoded = np.array([max(0, a.output_tokens - 1) for a in requests], dtype=np.float64)
    alpha = np.array([a.alpha for a in requests], dtype=np.float64)
    steps = decoded * (1.0 - alpha)
    # KV a request's decode steps read beyond its prompt: the tokens written before each step.
    # Summed over the output levels m a step starts at or above, that is d (d - 1) / 2 less each
    # step's overshoot; with acceptance a, a step overshoots by a / (1 - a)^2 at most on
    # average, and there are d steps at most.
    overshoot = alpha / np.square(1.0 - alpha)
    growth = (1.0 - alpha) * np.maximum(0.0, decoded * (decoded - 1) / 2 - overshoot * decoded)
    kv_read = prompt + steps * prompt + growth
    pairs = prompt * (prompt - 1) / 2 + decoded * prompt + growth
    compute = ((prompt + decoded) * model.flops_per_token + pairs * model.flops_per_pair) * p.inv_flops
    memory = kv_read * (model.weight_bytes / kv_tokens + model.kv_bytes_per_token) * p.inv_bandwidth
    fixed = kv_read / kv_tokens * p.overhead_s + (1.0 + steps) * p.per_sequence_s
    return fixed, compute, memory


def cheapest_share(costs: np.ndarray, share: float = TARGET) -> float:
    """The sum of the cheapest `share` of the costs (rounded up to whole requests)."""
    keep = math.ceil(share * len(costs) - 1e-9)
    return float(np.sort(costs)[:keep].sum())


def upper_bound(profile: Profile, arrivals: list[Arrival], kv_tokens: int, share: float = TARGET) -> float:
    """Arrivals per second per GPU (tool calling: whole tasks) above which no policy meets the
    SLOs of `share` of the requests in steady state: the arrivals over the GPU seconds their
    cheapest `share` takes at least."""
    if not arrivals:
        return math.inf
    fixed, compute, memory = request_costs(profile, arrivals, kv_tokens)
    if profile.params.combine == "max":
        seconds = max(cheapest_share(fixed + compute, share), cheapest_share(fixed + memory, share))
    else:
        seconds = cheapest_share(fixed + compute + memory, share)
    return len(arrivals) / seconds if seconds > 0 else math.inf
