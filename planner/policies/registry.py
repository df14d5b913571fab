"""Every policy by name, built from one config object: the live planner, the command line and
the simulator all make their policies here, so a knob means the same everywhere. The ablations
of `slos` (the paper's) are named configs too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.policies.base import Policy
from planner.policies.edf import EDFPolicy
from planner.policies.fcfs import DistServePolicy, FCFSPolicy
from planner.policies.sarathi import SarathiPolicy
from planner.policies.slos import SLOPolicy
from shared.roofline import Profile
from shared.settings import Settings

POLICY_NAMES = ("slos", "fcfs", "sarathi", "distserve", "edf")
# slos without one of its parts: speculation, routing across replicas, the best-effort queue
ABLATIONS: dict[str, dict[str, Any]] = {
    "slos-no-spec": {"max_spec_len": 0},
    "slos-least-loaded": {"routing": "least-loaded"},  # each request bound to a replica as the baselines place them
    "slos-round-robin": {"routing": "round-robin"},
    "slos-no-burst": {"best_effort_limit": 0},
}
ALL_NAMES = POLICY_NAMES + tuple(ABLATIONS)


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs a deployment sets; each policy reads the ones it has."""

    max_num_seqs: int = 64  # sequences a step holds at most
    prefill_tokens: int = 512  # FCFS and DistServe: prompt tokens one step prefills at most
    chunk_tokens: int = 512  # Sarathi and EDF: tokens (prefill chunks and decodes) a step carries at most
    spec_len: int = 0  # the baselines' fixed speculative length
    best_effort_limit: int = 256  # slos: parked requests before new ones are refused
    ttft_reserve: float = 0.0  # slos: what a new promise leaves of the time to its TTFT (`SLOPolicy`)
    front_end_s: float = 0.0  # slos: a token's trip to the client (the simulator has none)

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyConfig:
        tokens = settings.max_batch_tokens
        return cls(settings.max_num_seqs, tokens, tokens, settings.spec_len, settings.best_effort_limit,
                   settings.ttft_reserve, settings.front_end_ms / 1e3)


def make_policy(name: str, config: PolicyConfig, profile: Profile, draft: Profile | None = None) -> Policy:
    """The named policy (or ablation), configured by `config`."""
    c = config
    match name:
        case "slos":
            return SLOPolicy(profile, draft, max_num_seqs=c.max_num_seqs, best_effort_limit=c.best_effort_limit,
                             ttft_reserve=c.ttft_reserve, front_end_s=c.front_end_s)
        case "fcfs":
            return FCFSPolicy(max_batch_tokens=c.prefill_tokens, max_num_seqs=c.max_num_seqs, spec_len=c.spec_len)
        case "distserve":
            return DistServePolicy(max_batch_tokens=c.prefill_tokens, max_num_seqs=c.max_num_seqs,
                                   spec_len=c.spec_len)
        case "sarathi":
            return SarathiPolicy(max_batch_tokens=c.chunk_tokens, max_num_seqs=c.max_num_seqs, spec_len=c.spec_len)
        case "edf":
            return EDFPolicy(profile, max_batch_tokens=c.chunk_tokens, max_num_seqs=c.max_num_seqs,
                             spec_len=c.spec_len)
    if name in ABLATIONS:
        knobs = {"best_effort_limit": c.best_effort_limit, "ttft_reserve": c.ttft_reserve,
                 "front_end_s": c.front_end_s, **ABLATIONS[name]}
        return SLOPolicy(profile, draft, max_num_seqs=c.max_num_seqs, name=name, **knobs)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(ALL_NAMES)}")
