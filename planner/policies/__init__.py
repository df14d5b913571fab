"""Scheduling policies: pure functions of planner state and the clock."""

from planner.policies.base import Decisions, Policy, WorkerBatch
from planner.policies.fcfs import FCFSPolicy

POLICIES: dict[str, type[Policy]] = {"fcfs": FCFSPolicy}

__all__ = ["POLICIES", "Decisions", "Policy", "WorkerBatch"]
