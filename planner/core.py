"""The planner's state machine: messages in, messages out.

It keeps request and worker state up to date from messages (`handle`), asks the policy what to
run whenever a worker is idle and applies its decisions, reserving KV blocks (`schedule`), and
returns the batch orders and the gateway's messages to send. It owns no socket, thread or
clock of its own, so the process loop (`planner.loop`), the simulator and the tests drive the
same code. It never touches tensors and never sees tokens beyond counts.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec
import numpy as np

from planner.costs import batch_shape
from planner.decisions import Decisions, WorkerBatch
from planner.orders import batch_order
from planner.policies.base import Policy
from planner.roles import conflicts
from planner.state import Attainment, Handover, PlannerState, RequestState, WorkerState, remember
from shared.clock import Clock
from shared.messages import (
    Abort,
    Admitted,
    BatchOrder,
    ClusterStatus,
    GatewayHello,
    Heartbeat,
    Lost,
    Message,
    Parked,
    Refused,
    Role,
    SLOCount,
    SpecCounts,
    StepReport,
    Submit,
    WorkerHello,
    WorkerStatus,
)
from shared.roofline import Profile, split
from shared.slo import SLOClass, Tracker, UnknownSLOClass, resolve, with_default_class

log = logging.getLogger(__name__)

VERDICTS_KEPT = 10_000  # recent requests whose admission verdict the admin API can explain
LOST_KEPT = 10_000  # token times of the latest requests lost, for when they come back
TURNAROUND_S = 0.02  # a new order sooner than this after a report follows on from that step


@dataclass
class Planner:
    """State transitions of the planner, separate from its sockets so that the loop, the
    simulator and the tests drive the same code."""

    policy: Policy
    clock: Clock
    slo_classes: dict[str, SLOClass]
    worker_timeout_s: float
    profile: Profile | None = None  # to learn how each worker's steps run against it (planner.calibration)
    default_class: str | None = None  # the class of requests that name no objectives; None: best effort
    state: PlannerState = field(default_factory=PlannerState)
    pending_aborts: dict[str, list[str]] = field(default_factory=dict)
    next_step_id: int = 0
    generated_tokens: int = 0
    handovers: int = 0
    preemptions: int = 0
    caught_up: int = 0  # batches that held prefill back for a promised request behind its TPOT
    queue_room: int = -1  # the last call's `Decisions.queue_room`
    verdicts: OrderedDict[str, str] = field(default_factory=OrderedDict)  # request -> why, newest last
    unsent_roles: dict[str, Role] = field(default_factory=dict)  # role changes the worker has not been told
    # request -> its token times so far, and whether it was served best effort
    lost: OrderedDict[str, tuple[Tracker, bool]] = field(default_factory=OrderedDict)
    planner_id: str = field(default_factory=lambda: secrets.token_hex(8))  # new with every planner process
    gateway_id: str | None = None  # the gateway the held requests came from

    def __post_init__(self) -> None:
        self.state.lengths.typical.update({k: c.output_tokens - c.target.staged_tokens()
                                           for k, c in self.slo_classes.items()})

    def handle(self, msg: Message) -> list[Message]:
        """Take one message from the gateway or a worker; what to tell the gateway at once."""
        match msg:
            case Submit():
                return self.on_submit(msg)
            case Abort():
                self.on_abort(msg)
            case GatewayHello():
                self.on_gateway_hello(msg)
            case WorkerHello():
                return self.on_hello(msg)
            case Heartbeat():
                self.on_heartbeat(msg)
            case StepReport():
                return self.on_report(msg)
            case _:
                log.warning("ignored unexpected %s", type(msg).__name__)
        return []

    def on_submit(self, msg: Submit) -> list[Message]:
        """Messages for the gateway in answer to a submission."""
        if msg.request_id in self.state.requests:
            if msg.after_restart:  # it reached this planner before the gateway knew of it
                return []
            return [Refused(msg.request_id, "duplicate request id", retry_after_s=0.0)]
        if not msg.prompt_token_ids:  # the gateway sends none; held, it would never be scheduled
            return [Refused(msg.request_id, "empty prompt", retry_after_s=0.0)]
        spec = with_default_class(msg.slo, self.default_class)
        try:
            slo = resolve(spec, self.slo_classes)
        except UnknownSLOClass as exc:
            return [Refused(msg.request_id, str(exc), retry_after_s=0.0)]
        late_task = msg.slo.task in self.state.late_tasks
        if late_task:  # the task is late already: so is this request, served best effort
            slo = msgspec.structs.replace(slo, ttft_ms=0.0)
        # a request lost and sent again goes on with its token times: its first token is due when
        # it was, and a pause counts against its TPOT, as its client sees them; one served best
        # effort comes back parked for best effort, not as a new promise
        tracker, best_effort = self.lost.pop(msg.request_id, (None, False))
        req = self.state.requests[msg.request_id] = RequestState(
            request_id=msg.request_id,
            prompt_token_ids=tuple(msg.prompt_token_ids),
            params=msg.params,
            slo=slo,
            arrival=self.clock.now(),
            slo_class=spec.slo_class,
            resume_token_ids=tuple(msg.resume_token_ids),
            num_output=len(msg.resume_token_ids),
            expected_output=min(msg.params.max_tokens,
                                self.state.lengths.estimate(spec.slo_class, slo.staged_tokens())),
            task=msg.slo.task,
            serve_unmeetable=msg.slo.serve_unmeetable or late_task,
            tracker=tracker,
            parked=best_effort,
            best_effort=best_effort,
        )
        self.state.waiting.add(req)
        return []

    def on_abort(self, msg: Abort) -> None:
        req = self.state.requests.get(msg.request_id)
        if req is None:
            return
        log.info("request %s: aborted (%s)", msg.request_id, msg.reason)
        if req.worker_id is not None and req.delivered:
            self.pending_aborts.setdefault(req.worker_id, []).append(msg.request_id)
        if req.handover is not None and req.handover.decode_worker is not None and req.handover.import_sent:
            self.pending_aborts.setdefault(req.handover.decode_worker, []).append(msg.request_id)
        self.state.forget(req)

    def on_gateway_hello(self, msg: GatewayHello) -> None:
        """A gateway started: what came from another one has no client left to stream to."""
        if msg.gateway_id == self.gateway_id:
            return
        if self.state.requests:
            log.warning("gateway %s started: aborting the %d requests of the one before", msg.gateway_id,
                        len(self.state.requests))
        for req in list(self.state.requests.values()):
            self.on_abort(Abort(req.request_id, "its gateway is gone"))
        self.gateway_id = msg.gateway_id

    def on_hello(self, msg: WorkerHello) -> list[Message]:
        lost = self._drop_worker(msg.worker_id) if msg.worker_id in self.state.workers else []
        self.state.workers[msg.worker_id] = WorkerState(
            worker_id=msg.worker_id,
            role=msg.role,
            num_blocks=msg.num_blocks,
            block_size=msg.block_size,
            max_model_len=msg.max_model_len,
            last_seen=self.clock.now(),
            reported_free_blocks=msg.num_blocks,
            speculator=msg.speculator,
        )
        log.info("worker %s joined: role %s, %d KV blocks of %d tokens (pid %d)",
                 msg.worker_id, msg.role, msg.num_blocks, msg.block_size, msg.pid)
        return lost

    def on_heartbeat(self, msg: Heartbeat) -> None:
        worker = self.state.workers.get(msg.worker_id)
        if worker is not None:
            worker.last_seen = self.clock.now()
            worker.reported_free_blocks = msg.free_blocks

    def on_report(self, msg: StepReport) -> list[Message]:
        """Messages for the gateway: requests that had to end."""
        worker = self.state.workers.get(msg.worker_id)
        if worker is None or worker.step_in_flight != msg.step_id:
            log.warning("worker %s: unexpected report for step %d", msg.worker_id, msg.step_id)
            return []
        now = self.clock.now()
        worker.step_in_flight = None
        worker.in_flight_prefill = {}
        worker.last_seen = now
        worker.reported_free_blocks = msg.free_blocks
        worker.busy_s += msg.duration_s
        worker.waited_s += msg.waited_s
        if worker.order_parts is not None:
            worker.fit.add(*worker.order_parts, now - worker.order_sent_at)
        worker.last_report_at = now
        requests, worker_id, step_id = self.state.requests, msg.worker_id, msg.step_id
        for p in msg.progress:  # the planner's hot loop: every request of every step
            req = requests.get(p.request_id)
            if (req is None or worker_id not in (req.worker_id, req.decode_worker)
                    or req.first_step is None or step_id < req.first_step):
                continue  # gone, or preempted and resubmitted since the step began: not this step's to update
            if req.decode_worker == worker_id:
                self._complete_handover(req)
            new_tokens = p.num_output_tokens - req.num_output
            self.generated_tokens += new_tokens
            req.tracker.add(new_tokens, now)
            req.num_computed = p.num_computed_tokens
            req.num_output = p.num_output_tokens
            if p.num_proposed:
                counts = self.state.speculation.setdefault(req.slo_class or "default", SpecCounts())
                counts.proposed += p.num_proposed
                counts.accepted += p.num_accepted
                counts.steps += 1
                counts.rejected += p.num_accepted < p.num_proposed
            if req.phase != "decode" and req.num_computed >= req.prefill_len and worker.role != "prefill":
                req.phase = "decode"
            if p.finish_reason is not None:
                if p.finish_reason in ("stop", "length"):
                    self.state.lengths.observe(req.slo_class, req.num_output, req.slo.staged_tokens())
                    self._judge(req, req.tracker.met())
                self.state.forget(req)
            elif req.worker_id == worker_id and req.phase == "decode":
                worker.regrow(req)
        for rid in msg.out_of_blocks:
            log.warning("request %s: worker %s is out of KV blocks; it waits a step", rid, msg.worker_id)
        for export in msg.exports:
            req = self.state.requests.get(export.request_id)
            if req is None:  # aborted meanwhile: the worker still holds it
                self.pending_aborts.setdefault(msg.worker_id, []).append(export.request_id)
            elif worker.role == "prefill":
                req.handover = Handover(export)
                req.phase = "handover"
            else:  # the worker changed roles during the step: it decodes the request itself
                self._keep(req, worker)
        lost: list[Message] = []
        for rid in msg.failed_imports:
            req = self.state.requests.get(rid)
            if req is not None and req.decode_worker == msg.worker_id:
                log.error("request %s: worker %s could not read its KV; the gateway resubmits it",
                          rid, msg.worker_id)
                lost += self._lose(req, f"KV import on {msg.worker_id} failed")
        return lost

    def check_workers(self) -> list[Message]:
        """Declare silent workers dead; their requests end with an error."""
        now = self.clock.now()
        lost: list[Message] = []
        for worker in list(self.state.workers.values()):
            if worker.alive and now - worker.last_seen > self.worker_timeout_s:
                log.error("worker %s: no heartbeat for %.1f s, declared dead",
                          worker.worker_id, now - worker.last_seen)
                lost += self._drop_worker(worker.worker_id)
        return lost

    def schedule(self) -> tuple[dict[str, BatchOrder], list[Message]]:
        """Batch orders per worker, and verdicts for the gateway."""
        for worker in self.state.workers.values():
            if (worker.target_role is not None and worker.step_in_flight is None
                    and not conflicts(self.state, worker, worker.target_role)):
                self._set_role(worker, worker.target_role)
        decisions = self.policy.schedule(self.state, self.clock.now())
        to_gateway = self._apply(decisions)
        orders: dict[str, BatchOrder] = {}
        for worker_id, batch in decisions.batches.items():
            worker = self.state.workers[worker_id]
            now = self.clock.now()  # a step right after the last one counts the planner's turnaround too
            worker.order_sent_at = worker.last_report_at if now - worker.last_report_at < TURNAROUND_S else now
            worker.order_parts = None
            worker.in_flight_prefill = dict(batch.prefill)
            if self.profile is not None:
                parts = split(self.profile.model, self.profile.params, batch_shape(self.state, batch))
                worker.order_parts = tuple(float(np.ravel(x)[0]) for x in parts)
            orders[worker_id] = batch_order(self.state, worker_id, batch, self._next_step(), self.policy.name)
        for worker_id in list(self.pending_aborts) + list(self.unsent_roles):
            worker = self.state.workers.get(worker_id)
            if worker is not None and worker.alive and worker.step_in_flight is None and worker_id not in orders:
                worker.order_parts = None
                orders[worker_id] = batch_order(self.state, worker_id, WorkerBatch(), self._next_step(),
                                                self.policy.name)
        for worker_id, order in orders.items():
            order.aborts = self.pending_aborts.pop(worker_id, [])
            order.role = self.unsent_roles.pop(worker_id, None)
            self.state.workers[worker_id].step_in_flight = order.step_id
        return orders, to_gateway

    def status(self, dropped: int) -> ClusterStatus:
        running = sum(1 for r in self.state.requests.values() if r.worker_id is not None)
        parked = sum(1 for r in self.state.requests.values() if r.parked and r.worker_id is None)
        return ClusterStatus(
            workers=[
                WorkerStatus(w.worker_id, w.role, w.alive, w.num_blocks, w.reported_free_blocks,
                             len(w.requests), w.busy_s, w.waited_s)
                for w in self.state.workers.values()
            ],
            waiting=len(self.state.waiting),
            running=running,
            generated_tokens=self.generated_tokens,
            dropped_messages=dropped,
            speculation=self.state.speculation,
            handovers=self.handovers,
            parked=parked,
            preemptions=self.preemptions,
            attainment={k: SLOCount(a.met, a.total) for k, a in self.state.attainment.items()},
            promises={k: SLOCount(a.met, a.total) for k, a in self.state.promises.items()},
            caught_up=self.caught_up,
            planner_id=self.planner_id,
            queue_room=self.queue_room,
        )

    def explain(self, request_id: str) -> str | None:
        """The latest verdict on a request: admitted where, parked or refused and why."""
        return self.verdicts.get(request_id)

    def _note(self, request_id: str, verdict: str) -> None:
        remember(self.verdicts, request_id, verdict, VERDICTS_KEPT)

    def _judge(self, req: RequestState, met: bool, refused: bool = False) -> None:
        best_effort = req.best_effort or not req.slo.has_objectives()
        kind = "refused" if refused else "best_effort" if best_effort else "promised"
        for counts in (self.state.attainment.setdefault(req.slo_class or "default", Attainment()),
                       self.state.promises.setdefault(kind, Attainment())):
            counts.total += 1
            counts.met += met
        if kind == "promised" and not met:
            log.warning("request %s: promised and missed its SLOs (TTFT %s s, TPOT %s s)", req.request_id,
                        req.tracker.ttft_s, req.tracker.stage_tpots_s())
        if not met and req.task is not None:
            self.state.task_missed(req.task)

    def _apply(self, decisions: Decisions) -> list[Message]:
        out: list[Message] = []
        self.caught_up += decisions.caught_up
        self.queue_room = decisions.queue_room
        kept = set()
        for worker_id, role in decisions.roles.items():
            kept |= self.move(self.state.workers[worker_id], role)
        for rid, reason in decisions.refuse:
            log.info("request %s: refused (%s)", rid, reason)
            self._note(rid, f"refused: {reason}")
            self._judge(self.state.requests[rid], met=False, refused=True)
            self.state.forget(self.state.requests[rid])
            out.append(Refused(rid, reason, retry_after_s=1.0))
        for rid, reason in decisions.park:
            log.info("request %s: parked (%s)", rid, reason)
            self._note(rid, f"parked: {reason}")
            self.state.requests[rid].parked = True
            self.state.waiting.park(rid)
            out.append(Parked(rid, reason))
        for rid, reason in decisions.preempt:
            log.info("request %s: preempted (%s)", rid, reason)
            self._note(rid, f"preempted: {reason}")
            self.preemptions += 1
            out += self._lose(self.state.requests[rid], reason, preempted=True)
        for rid, worker_id in decisions.handover.items():
            req = self.state.requests[rid]
            worker = self.state.workers[worker_id]
            handover = req.handover
            if handover is None and rid in kept:
                continue  # its worker turned decode above and keeps it: no KV to move
            if handover is None:  # a policy bug must not take the planner down
                log.error("policy %s handed over request %s, which has no KV to hand", self.policy.name, rid)
                continue
            handover.decode_worker = worker_id
            handover.reserved_blocks = worker.blocks_for(req.tokens_on(worker.role))
            worker.reserved_blocks += handover.reserved_blocks
            worker.requests.append(rid)
            req.phase = "transfer"
            log.info("request %s: handed from %s to %s", rid, req.worker_id, worker_id)
        for rid, worker_id in decisions.assign.items():
            req = self.state.requests[rid]
            worker = self.state.workers[worker_id]
            req.worker_id = worker_id
            req.phase = "prefill"
            req.best_effort = rid in decisions.best_effort
            req.reserved_blocks = worker.blocks_for(req.tokens_on(worker.role))
            worker.reserved_blocks += req.reserved_blocks
            worker.requests.append(rid)
            self.state.waiting.discard(rid)
            how = "as best effort" if req.best_effort else "with its SLOs promised"
            log.info("request %s: admitted to worker %s %s", rid, worker_id, how)
            self._note(rid, f"admitted to worker {worker_id} {how}")
            out.append(Admitted(rid, promised=not req.best_effort))
        return out

    def move(self, worker: WorkerState, role: Role) -> set[str]:
        """Give a worker a new role: now, or once its step in flight has reported (it ran under the
        old role, and its report is read so) and it holds nothing the new role could not finish
        (it takes no new requests meanwhile). Returns the requests it now keeps (`_set_role`)."""
        if role == worker.role and worker.target_role is None:
            return set()
        self.state.last_role_change = self.clock.now()
        if worker.step_in_flight is not None or conflicts(self.state, worker, role):
            log.info("worker %s: becomes %s once its current requests allow", worker.worker_id, role)
            worker.target_role = role
            return set()
        return self._set_role(worker, role)

    def _set_role(self, worker: WorkerState, role: Role) -> set[str]:
        """Change a worker's role now; a prefill worker turning colocated or decode decodes the
        requests it holds for a handover itself. Returns those requests."""
        log.info("worker %s: role %s -> %s", worker.worker_id, worker.role, role)
        worker.role, worker.target_role = role, None
        self.unsent_roles[worker.worker_id] = role
        kept = set()
        for rid in list(worker.requests):
            req = self.state.requests[rid]
            if req.phase == "handover" and req.worker_id == worker.worker_id and role != "prefill":
                self._keep(req, worker)
                kept.add(rid)
        return kept

    def _keep(self, req: RequestState, worker: WorkerState) -> None:
        """A prefilled request decodes where it was prefilled."""
        req.phase, req.handover = "decode", None
        worker.regrow(req)

    def _next_step(self) -> int:
        self.next_step_id += 1
        return self.next_step_id

    def _complete_handover(self, req: RequestState) -> None:
        """The decode worker has the request: the prefill worker may free it."""
        source = self.state.workers.get(req.worker_id or "")
        if source is not None:
            source.reserved_blocks -= req.reserved_blocks
            source.requests.remove(req.request_id)
            self.pending_aborts.setdefault(source.worker_id, []).append(req.request_id)
        handover = req.handover
        assert handover is not None
        req.worker_id, req.reserved_blocks, req.handover = handover.decode_worker, handover.reserved_blocks, None
        req.phase = "decode"
        self.handovers += 1

    def _lose(self, req: RequestState, reason: str, preempted: bool = False) -> list[Message]:
        """Free the request wherever it is held and tell the gateway, which resubmits it
        after the tokens the client already has."""
        for worker_id in (req.worker_id, req.decode_worker):
            worker = self.state.workers.get(worker_id or "")
            if worker is not None and worker.alive:
                self.pending_aborts.setdefault(worker.worker_id, []).append(req.request_id)
        self.state.forget(req)
        remember(self.lost, req.request_id, (req.tracker, req.best_effort), LOST_KEPT)
        return [Lost(req.request_id, reason, preempted)]

    def _drop_worker(self, worker_id: str) -> list[Message]:
        worker = self.state.workers[worker_id]
        worker.alive = False
        lost: list[Message] = []
        for rid in list(worker.requests):
            req = self.state.requests[rid]
            if req.decode_worker == worker_id:  # it died taking the request over: hand it again
                log.error("request %s: decode worker %s lost during the handover", rid, worker_id)
                worker.requests.remove(rid)
                req.handover = Handover(req.handover.export)  # type: ignore[union-attr]
                req.phase = "handover"
                continue
            log.error("request %s: lost with worker %s; the gateway resubmits it", rid, worker_id)
            lost += self._lose(req, f"worker {worker_id} died")
        self.pending_aborts.pop(worker_id, None)
        del self.state.workers[worker_id]
        return lost


def quiet_gc() -> None:
    """With thousands of requests queued a full garbage collection takes tens of milliseconds,
    a stall every batch would feel; the planner makes few reference cycles, so collect rarely."""
    gc.set_threshold(100_000, 50, 50)
