"""What the planner knows: requests, workers and their KV reservations. Plain data that the
policies read and the state machine (`planner.core`) updates from messages."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from planner.calibration import StepFit
from planner.lengths import LengthModel, expected_output
from planner.waiting import WaitingQueue
from shared.messages import ExportedRequest, Role, SamplingParams, SpecCounts
from shared.slo import SLOTarget, Tracker

# waiting -> prefill -> decode on one worker; in disaggregated mode a prefill worker's request
# goes prefill -> handover (prefilled, held, waiting for a decode worker) -> transfer (a decode
# worker is reading its KV) -> decode on the decode worker.
Phase = Literal["waiting", "prefill", "handover", "transfer", "decode"]
V = TypeVar("V")

RESERVE_AHEAD = 16  # tokens of room a decoding request keeps beyond what it has written
LATE_TASKS_KEPT = 10_000  # tasks remembered as late, the most recent


@dataclass
class Handover:
    """A prefilled request between its prefill worker and a decode worker: what the prefill
    worker holds, and, once one is chosen, the decode worker taking it over by reading its KV."""

    export: ExportedRequest
    decode_worker: str | None = None
    reserved_blocks: int = 0  # on the decode worker
    import_sent: bool = False  # the decode worker has been told to read the KV


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: tuple[int, ...]  # a tuple of ints, which the garbage collector stops scanning
    params: SamplingParams
    slo: SLOTarget
    arrival: float
    slo_class: str | None = None
    resume_token_ids: tuple[int, ...] = ()  # output streamed before a worker died
    expected_output: int = 0  # output tokens the plan assumes; grows when outlived
    phase: Phase = "waiting"
    worker_id: str | None = None
    num_computed: int = 0
    num_output: int = 0
    reserved_blocks: int = 0
    first_step: int | None = None  # the step whose order sent the worker the prompt; None: not sent yet
    handover: Handover | None = None  # from prefill worker to decode worker (disaggregated mode)
    parked: bool = False  # waiting in the best-effort queue
    task: str | None = None  # the task it belongs to (an agent's loop of calls)
    best_effort: bool = False  # served without a promise: preempted first when room is short
    serve_unmeetable: bool = False  # asked to be served best effort where no worker could keep its objectives
    tracker: Tracker | None = None
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        if self.tracker is None:
            self.tracker = Tracker(self.slo, self.arrival, resumed=bool(self.resume_token_ids),
                                   tokens=len(self.resume_token_ids))
        self.expected_output = max(self.expected_output, self.num_output)

    @property
    def decode_worker(self) -> str | None:
        """The worker taking the request over, during the transfer."""
        return self.handover.decode_worker if self.handover is not None else None

    @property
    def delivered(self) -> bool:
        """The worker has been sent the prompt."""
        return self.first_step is not None

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

    @property
    def deadline(self) -> float:
        """When the first token is due; inf for none (no objective, or already streamed)."""
        return self.tracker.deadline()

    @property
    def tpot_s(self) -> float | None:
        """The TPOT objective of the next token, in seconds; None for none."""
        if self.best_effort:
            return None
        tpot = self.slo.tpot_at(self.num_output) if self.slo.stages else self.slo.tpot_ms
        return None if tpot is None else tpot / 1e3

    def planned_output(self) -> int:
        """Output tokens to reserve KV for: what the request holds on average over its life
        (half the output it is expected to write), and never less than what it has written
        plus room for the next steps. Requests grow and finish at different times, so
        reservations that add up to the cache fit it on average; when they outgrow it the
        policy preempts some (`planner.policies.placement.relieve_memory`)."""
        written = self.num_output
        expected = expected_output(self.expected_output, written, self.params.max_tokens)
        return min(self.params.max_tokens, max(written + RESERVE_AHEAD, expected // 2))

    def output_left(self) -> int:
        """Output tokens its estimate says it will write yet; none once it has outlived it (its
        reservation then grows step by step, `planned_output`)."""
        return max(0, min(self.expected_output, self.params.max_tokens) - self.num_output)

    def life_context(self) -> int:
        """KV tokens a decode step of the request reads, on average over its life."""
        return self.prompt_len + expected_output(self.expected_output, self.num_output, self.params.max_tokens) // 2

    def tokens_on(self, role: Role) -> int:
        """Tokens of KV to reserve on a worker of this role: a prefill worker keeps only the
        prompt; any other holds the request as long as it is expected to grow."""
        return self.prefill_len if role == "prefill" else self.prompt_len + self.planned_output()


@dataclass
class WorkerState:
    worker_id: str
    role: Role
    num_blocks: int
    block_size: int
    max_model_len: int
    last_seen: float
    speculator: str = "none"
    home_role: Role | None = None  # the role it joined with; None: `role`
    reserved_blocks: int = 0
    reported_free_blocks: int = 0
    step_in_flight: int | None = None
    requests: list[str] = field(default_factory=list)
    alive: bool = True
    fit: StepFit = field(default_factory=StepFit)  # how its steps run against the performance model
    order_sent_at: float = 0.0
    order_parts: tuple[float, ...] | None = None  # the model's (fixed, compute, memory) seconds of its step in flight
    in_flight_prefill: dict[str, int] = field(default_factory=dict)  # prompt tokens its step in flight runs, by request
    last_report_at: float = -math.inf
    busy_s: float = 0.0  # its steps' durations, summed
    waited_s: float = 0.0  # the time it waited for orders while requests it ran went on, summed
    draining: bool = False  # an operator asked it to take no new requests
    target_role: Role | None = None  # changing to this role once its current work allows: takes no new requests

    def __post_init__(self) -> None:
        self.home_role = self.home_role or self.role

    @property
    def unreserved_blocks(self) -> int:
        return self.num_blocks - self.reserved_blocks

    @property
    def can_prefill(self) -> bool:
        return self.alive and self.role != "decode"

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def regrow(self, req: RequestState) -> None:
        """Re-plan a request's KV reservation as its output grows (it may outlive its length
        estimate); a worker whose requests outgrow it preempts some (`relieve_memory`)."""
        if req.prompt_len + req.num_output + RESERVE_AHEAD <= req.reserved_blocks * self.block_size:
            return  # the common case: the reservation still has room ahead
        need = max(req.reserved_blocks, self.blocks_for(req.tokens_on(self.role)))
        self.reserved_blocks += need - req.reserved_blocks
        req.reserved_blocks = need


@dataclass
class Attainment:
    """Requests that met all their SLOs, of those finished or refused, per class."""

    met: int = 0
    total: int = 0

    @property
    def share(self) -> float:
        return self.met / self.total if self.total else math.nan


@dataclass
class PlannerState:
    requests: dict[str, RequestState] = field(default_factory=dict)
    speculation: dict[str, SpecCounts] = field(default_factory=dict)  # by SLO class
    waiting: WaitingQueue = field(default_factory=WaitingQueue)  # unassigned, in arrival order
    workers: dict[str, WorkerState] = field(default_factory=dict)
    lengths: LengthModel = field(default_factory=LengthModel)
    attainment: dict[str, Attainment] = field(default_factory=dict)  # by SLO class
    promises: dict[str, Attainment] = field(default_factory=dict)  # promised, best_effort, refused
    late_tasks: OrderedDict[str, None] = field(default_factory=OrderedDict)  # the latest LATE_TASKS_KEPT
    # disaggregated: every worker plays its home role, falling back to colocated when a pool
    # is lost; colocated: every worker runs both (see planner.roles)
    mode: Literal["colocated", "disaggregated"] = "disaggregated"
    last_role_change: float = -math.inf

    def task_missed(self, task: str) -> None:
        remember(self.late_tasks, task, None, LATE_TASKS_KEPT)

    def idle_workers(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive and w.step_in_flight is None]

    def acceptance(self, slo_class: str | None) -> SpecCounts:
        return self.speculation.get(slo_class or "default", SpecCounts())

    def forget(self, req: RequestState) -> None:
        """The request is gone: its place in the queue, or its workers' blocks, are free."""
        self.requests.pop(req.request_id, None)
        if req.worker_id is None:
            self.waiting.discard(req.request_id)
            return
        decode_reserved = req.handover.reserved_blocks if req.handover is not None else 0
        for worker_id, reserved in ((req.worker_id, req.reserved_blocks), (req.decode_worker, decode_reserved)):
            worker = self.workers.get(worker_id or "")
            if worker is not None:
                worker.reserved_blocks -= reserved
                worker.requests.remove(req.request_id)



def remember(recent: OrderedDict[str, V], key: str, value: V, most: int) -> None:
    """Keep `key` as the newest entry of `recent`, and only the `most` newest entries."""
    recent[key] = value
    recent.move_to_end(key)
    while len(recent) > most:
        recent.popitem(last=False)
