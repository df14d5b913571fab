"""Scheduling policies: pure functions of planner state and the clock. `slos` is the product;
the others are the baselines it is measured against."""

from __future__ import annotations

from planner.policies.base import Decisions, Policy, WorkerBatch
from planner.policies.edf import EDFPolicy
from planner.policies.fcfs import DistServePolicy, FCFSPolicy
from planner.policies.sarathi import SarathiPolicy
from planner.policies.slos import SLOPolicy
from shared.roofline import Profile
from shared.settings import Settings

POLICY_NAMES = ("slos", "fcfs", "sarathi", "distserve", "edf")


def make_policy(name: str, settings: Settings, profile: Profile, draft: Profile | None = None) -> Policy:
    """The named policy, configured from the settings."""
    seqs, tokens, k = settings.max_num_seqs, settings.max_batch_tokens, settings.spec_len
    match name:
        case "slos":
            return SLOPolicy(profile, draft, max_num_seqs=seqs, best_effort_limit=settings.best_effort_limit)
        case "fcfs":
            return FCFSPolicy(max_batch_tokens=tokens, max_num_seqs=seqs, spec_len=k)
        case "distserve":
            return DistServePolicy(max_batch_tokens=tokens, max_num_seqs=seqs, spec_len=k)
        case "sarathi":
            return SarathiPolicy(max_batch_tokens=tokens, max_num_seqs=seqs, spec_len=k)
        case "edf":
            return EDFPolicy(profile, max_batch_tokens=tokens, max_num_seqs=seqs, spec_len=k)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


__all__ = ["POLICY_NAMES", "Decisions", "Policy", "WorkerBatch", "make_policy"]
