"""The interface every scheduling policy implements.

A policy reads the state and the time and returns decisions as plain data
(`planner.decisions`); it changes nothing. The planner's state machine applies the decisions,
so the same policy code runs live, in the simulator and in unit tests.
"""

from __future__ import annotations

from typing import Protocol

from planner.decisions import Decisions
from planner.state import PlannerState


class Policy(Protocol):
    name: str

    def schedule(self, state: PlannerState, now: float) -> Decisions: ...
