"""What a policy decides, as plain data: one step per worker, admissions, handovers, refusals,
parkings, preemptions and role changes. The planner's state machine applies them; nothing here
knows how they were made."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.messages import Role


@dataclass
class WorkerBatch:
    """One engine step for one worker: prefill chunks (request, tokens) and decode requests,
    each speculating its `spec_lens` entry (absent: none)."""

    prefill: list[tuple[str, int]] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    spec_lens: dict[str, int] = field(default_factory=dict)  # speculative length per decode request

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


@dataclass
class Decisions:
    assign: dict[str, str] = field(default_factory=dict)  # request -> worker
    handover: dict[str, str] = field(default_factory=dict)  # prefilled request -> decode worker
    batches: dict[str, WorkerBatch] = field(default_factory=dict)  # worker -> next step
    refuse: list[tuple[str, str]] = field(default_factory=list)  # (request, reason)
    park: list[tuple[str, str]] = field(default_factory=list)  # (request, reason): best-effort queue
    preempt: list[tuple[str, str]] = field(default_factory=list)  # (running request, reason)
    roles: dict[str, Role] = field(default_factory=dict)  # worker -> its new role
    best_effort: set[str] = field(default_factory=set)  # assigned without a promise: preempted first
    caught_up: int = 0  # batches that prefilled only what the plan needs, for a promised request behind its TPOT
    queue_room: int = -1  # requests with objectives the best-effort queue still takes; -1: no bound
