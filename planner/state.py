"""What the planner knows: requests, workers and their KV reservations. Plain data that the
policies read and the service updates from messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.messages import ExportedRequest, Role, SamplingParams, SpecCounts
from shared.slo import SLOTarget

# waiting -> prefill -> decode on one worker; in disaggregated mode a prefill worker's request
# goes prefill -> handover (prefilled, held, waiting for a decode worker) -> transfer (a decode
# worker is reading its KV) -> decode on the decode worker.
Phase = Literal["waiting", "prefill", "handover", "transfer", "decode"]


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    slo: SLOTarget
    arrival: float
    slo_class: str | None = None
    resume_token_ids: list[int] = field(default_factory=list)  # output streamed before a worker died
    phase: Phase = "waiting"
    worker_id: str | None = None
    num_computed: int = 0
    num_output: int = 0
    reserved_blocks: int = 0
    delivered: bool = False  # the worker has been sent the prompt
    export: ExportedRequest | None = None  # what the prefill worker holds for the handover
    decode_worker: str | None = None  # taking the request over, during the transfer
    decode_reserved: int = 0
    import_sent: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to prefill: the prompt, and the output streamed before if resumed."""
        return self.prompt_len + len(self.resume_token_ids)

    @property
    def prefill_left(self) -> int:
        return self.prefill_len - self.num_computed

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.params.max_tokens

    def tokens_on(self, role: Role) -> int:
        """Tokens of KV to reserve on a worker of this role: a prefill worker keeps only the
        prompt; any other holds the whole request."""
        return self.prefill_len if role == "prefill" else self.max_len


@dataclass
class WorkerState:
    worker_id: str
    role: Role
    num_blocks: int
    block_size: int
    max_model_len: int
    last_seen: float
    speculator: str = "none"
    reserved_blocks: int = 0
    reported_free_blocks: int = 0
    step_in_flight: int | None = None
    requests: list[str] = field(default_factory=list)
    alive: bool = True

    @property
    def unreserved_blocks(self) -> int:
        return self.num_blocks - self.reserved_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass
class PlannerState:
    requests: dict[str, RequestState] = field(default_factory=dict)
    speculation: dict[str, SpecCounts] = field(default_factory=dict)  # by SLO class
    waiting: list[str] = field(default_factory=list)  # unassigned, in arrival order
    workers: dict[str, WorkerState] = field(default_factory=dict)

    def idle_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive and w.step_in_flight is None]
