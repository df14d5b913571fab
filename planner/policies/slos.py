"""SLOs-Serve's policy: admit what the plan can keep on its SLOs, park the rest.

Routing: replicas (workers that prefill) are tried least loaded first, so a request goes to
the replica that can admit it with the most slack. On each, the admission plan
(`planner.admission`) takes the replica's decoding requests as the load every batch
carries, the requests it has promised as fixed, and the waiting requests as candidates; those
it admits go there, the rest try the next replica. On a prefill worker the decode pool's room
caps what may be admitted, so prefill never outruns decoding.

Soft admission: what no replica admits waits in the best-effort queue (the gateway hears
Parked) and is tried again at every call, so a burst is admitted as slack appears. A parked
request whose TTFT has passed has no deadline left: it is admitted as soon as there is room,
as best effort, without a TPOT promise, and it is the first to be preempted when admitted work
needs its KV blocks. Requests with no objectives at all are best effort too, and so, after a
call's wait, are those of a task already late (`SLOSpec.task`): the planner makes their first
token due at once. Beyond
`best_effort_limit` parked requests with objectives, new ones with objectives are refused at
once (HTTP 429, Retry-After; the gateway hears the queue's room and answers those beyond it
itself, without a trip to the planner), and so is a request whose TPOT no worker could keep
even decoding it alone: waiting would not help it. Requests without objectives are never refused
for a full queue: they wait, as a throughput scheduler's queue would hold them.
A worker that holds requests never idles: where its steps run slower than any plan for them
allows (a profile far too fast for the machine), it prefills them earliest deadline first;
and a promise already late gets at least `LATE_CHUNK` prompt tokens a batch where its
worker's decoders leave it no budget, rather than waiting for them to finish.

Speculation: each batch's period and speculative length come from the plan (the k that leaves
the most prefill budget at the tightest TPOT); every other decoding request speculates the
fewest tokens that keep its own TPOT at that period, and more while its tokens so far run
behind that TPOT, unless verifying them would cut the prefill the plan needs for a promised
prompt's deadline (that prompt, once late, would run last). Both count on the tokens a step
gains as a promise may, below their mean (`planner.spec_choice.promised_gains_row`):
acceptance is a draw. A step with no prefill to run (and any step on a decode worker, or
beside a request that memory turns away) raises those lengths to the floor that decodes the
most tokens per second within the period: requests that finish sooner free their KV blocks
and batch slots. Acceptance per SLO class comes from the workers' reports
(`planner.policies.speculation`).

Preemption: when requests outgrow a worker's KV cache (each reserves half the output it is
expected to write), best-effort requests go first, then those furthest ahead of their TPOT:
the pause until they are sent again costs them least. Their token times go on from where they
were (`Planner.lost`), so the pause counts against their TPOT and they speculate to catch up.

Roles: `planner.roles` falls back to colocated workers when a pool is lost and moves workers
between the pools when one of them is the bottleneck.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from planner.admission import Plan, plan
from planner.decisions import Decisions, WorkerBatch
from planner.jobs import Job, Jobs, earliest
from planner.memory import promise_blocks
from planner.policies.batch_sizing import hold_back, prefill_tokens, size_prefill
from planner.policies.best_effort import make_room, place_best_effort
from planner.policies.placement import (
    Load,
    Routing,
    chunked_batch,
    decode_pool,
    decoding,
    hand_over,
    homes,
    load_of,
    prefill_pool,
    refuse_oversized,
    relieve_memory,
    take,
)
from planner.policies.speculation import acceptance, for_speed, spec_lens
from planner.policies.unmeetable import refuse_unmeetable
from planner.prices import DEFAULT_CONTEXT, Replica, max_decode_batch
from planner.roles import choose_roles
from planner.state import PlannerState, RequestState, WorkerState
from planner.waiting import Rows
from shared.messages import MAX_SPEC_LEN, QUEUE_FULL
from shared.roofline import Profile, prefill_cost

STALLED_CHUNK = 512  # prefill tokens a worker runs when no plan fits what it holds
LATE_CHUNK = 64  # prompt tokens a batch gives a late promise that its decoders' TPOTs leave no room


@dataclass
class SLOPolicy:
    profile: Profile
    draft: Profile | None = None  # the draft model's cost, for workers that speculate with it
    max_num_seqs: int = 64
    best_effort_limit: int = 256
    max_spec_len: int = MAX_SPEC_LEN  # 0: no speculation
    routing: Routing = "slack"  # or an ablation's: bound to one replica, the least loaded or in turn
    rebalance: bool = True  # move workers between the pools when one is the bottleneck
    prior_alpha: float = 0.5  # per-token acceptance assumed before a class has reports
    ttft_reserve: float = 0.0  # share of the time left before a TTFT deadline a new promise leaves unused
    front_end_s: float = 0.0  # a token's trip from a worker to the client, through the gateway
    name: str = "slos"

    def schedule(self, state: PlannerState, now: float) -> Decisions:
        decisions = Decisions(roles=choose_roles(state, now, self.profile, self.rebalance, self.max_num_seqs))
        gone = relieve_memory(state, decisions, order=_most_ahead_first)
        load = load_of(state, gone)
        added: dict[str, list[str]] = {w: [] for w in state.workers}
        rows = state.waiting.rows()
        plans: dict[str, Plan] = {}
        parked = 0  # with objectives, in the best-effort queue after this call
        if len(rows):  # below capacity nothing waits most of the time
            refused = refuse_oversized(state, rows, decisions) | refuse_unmeetable(
                state, rows, decisions, self.profile, self.draft, self.max_spec_len, self.prior_alpha)
            candidates = ~rows.mask(list(refused))
            plans = self._admit(state, now, rows, candidates, load, added, decisions, gone)
            assigned, plain = rows.mask(list(decisions.assign)), rows.plain()
            # requests with objectives count against the limit; plain ones wait as a throughput
            # scheduler's queue would, since waiting makes nothing of theirs late
            parked = int((rows.parked & ~assigned & ~plain).sum())
            new = candidates & ~rows.parked & ~assigned
            for rid, has_objectives in zip(rows.ids[new].tolist(), (~plain[new]).tolist()):
                if has_objectives and parked >= self.best_effort_limit:
                    decisions.refuse.append((rid, QUEUE_FULL))
                else:
                    decisions.park.append((rid, "no worker can meet its SLOs now; waiting for room"))
                    parked += has_objectives
        # a full queue refuses what no plan admits, and a request that arrives meanwhile gets no
        # better: the gateway answers those beyond the room itself
        decisions.queue_room = max(0, self.best_effort_limit - parked) if self.best_effort_limit > 0 else -1
        hand_over(state, load, self.max_num_seqs, decisions, added,
                  accepts=lambda r, w: self._accepts(state, w, load[w.worker_id][1], r))

        for worker in state.idle_workers():
            request_ids = [r for r in worker.requests + added[worker.worker_id] if r not in gone]
            batch = WorkerBatch(decode=decoding(state, worker, request_ids, decisions))
            if worker.role == "decode":
                step_s, k = self._decode_period(state, worker, batch.decode)
                batch.spec_lens = self._spec_lens(state, worker, batch.decode, step_s, k)
                speed_up = True  # its capacity is how fast it decodes
            else:
                nobody = np.zeros(len(rows), dtype=bool)
                p = plans.get(worker.worker_id) or self._plan(state, worker, load, rows, nobody, now, gone)
                mine = set(request_ids)
                batch.prefill = [(rid, n) for rid, n in p.chunks.items() if rid in mine]
                batch.spec_lens = self._spec_lens(state, worker, batch.decode, p.step_s, p.spec_len)
                behind = any(_behind(state.requests[r]) for r in batch.decode)
                if batch.prefill:
                    planned, profile = batch.prefill, self._profile(worker)
                    batch.prefill = size_prefill(profile, state, batch, p.step_s, p.needed, behind)
                    if behind and prefill_tokens(batch.prefill) < min(p.needed, prefill_tokens(planned)):
                        # catching up would cost a promised prompt its deadline: speculate as the period needs
                        batch.spec_lens = self._spec_lens(state, worker, batch.decode, p.step_s, p.spec_len, False)
                        batch.prefill = size_prefill(profile, state, dataclasses.replace(batch, prefill=planned),
                                                 p.step_s, p.needed, behind)
                    batch.prefill = hold_back(state, batch.prefill, p, now)
                elif p.late:  # late already, and the decoders' TPOTs leave it nothing: a little, not never
                    late = next((r for r in p.admitted if r in p.late and r in mine), None)
                    if late is not None:
                        batch.prefill = [(late, min(LATE_CHUNK, state.requests[late].prefill_left))]
                decisions.caught_up += behind
                # the period's slack goes to prefill, unless there is none to run or memory,
                # not time, turns requests away: then decoding faster is what frees room
                step_s, speed_up = p.step_s, p.crowded or not batch.prefill
                if not batch:  # steps slower than any promise allows: serve late rather than never
                    batch = chunked_batch(state, worker, request_ids, decisions, 0, STALLED_CHUNK,
                                          order=lambda r: r.deadline)
            if speed_up and batch.decode and worker.speculator != "none" and self.max_spec_len:
                batch.spec_lens = for_speed(state, batch, step_s, self._profile(worker),
                                            self.draft if worker.speculator == "draft" else None,
                                            self.max_spec_len, self.prior_alpha)
            if batch:
                decisions.batches[worker.worker_id] = batch
        return decisions

    def _admit(self, state: PlannerState, now: float, rows: Rows, candidates: np.ndarray, load: Load,
               added: dict[str, list[str]], decisions: Decisions, gone: set[str]) -> dict[str, Plan]:
        """Route candidates to replicas, least loaded first, then best-effort ones into the slack
        left; returns each replica's plan."""
        plans: dict[str, Plan] = {}
        pool = sorted(prefill_pool(state), key=lambda w: (_backlog(state, w), -load[w.worker_id][0], w.worker_id))
        best_effort = (rows.parked & (rows.deadline < now)) | rows.plain()
        promising = candidates & ~best_effort
        home = None if self.routing == "slack" or not pool else homes(self.routing, rows, pool, load)
        for worker in pool:
            mine = promising if home is None else promising & (home == worker.worker_id)
            if not mine.any():
                continue
            p = plans[worker.worker_id] = self._plan(state, worker, load, rows, mine, now, gone)
            for rid in p.admitted:
                req = state.requests[rid]
                if req.phase == "waiting":
                    decisions.assign[rid] = worker.worker_id
                    added[worker.worker_id].append(rid)
                    take(req, worker, load)
            make_room(state, worker, load, decisions, gone)
            promising &= ~rows.mask(p.admitted)
        hopeful = np.flatnonzero(candidates & best_effort)
        if len(hopeful):
            nobody = np.zeros(len(rows), dtype=bool)
            place_best_effort(state, rows, hopeful, pool, load, plans, decisions, added, self.max_num_seqs,
                              lambda w: self._decode_room(state, w, 0, _tightest(state, added[w.worker_id])),
                              lambda w: self._plan(state, w, load, rows, nobody, now, gone))
        return plans

    def _plan(self, state: PlannerState, worker: WorkerState, load: Load, rows: Rows, candidates: np.ndarray,
              now: float, gone: set[str]) -> Plan:
        """The worker's admission plan: its running requests as load, its promised ones, and the
        waiting rows in `candidates`. TTFTs are planned to end `front_end_s` early (the first
        token still has to reach the client), and with `ttft_reserve` of the time left before
        them unused, for what the plan does not see coming (prompts that finish early and decode
        sooner than planned, steps that run long several at a time); the reserve loosens as the
        deadline nears, and a promise already made that only the reserve would break is planned
        to its own deadline instead, or, once that early end has passed, to its TTFT: planned as
        past its deadline it would run whenever the others leave room, and each request admitted
        after it would push it back (seen live: a prompt 6 tokens short of its TTFT waited 0.7 s).
        The prompt tokens of the step in flight are done when it ends, which `Replica.busy_s`
        prices: planned beyond it, not twice."""
        mine = [state.requests[r] for r in worker.requests if r not in gone]
        running, context, best_effort = 0, 0, 0
        tightest: RequestState | None = None
        tightest_tpot = math.inf
        tpots = []
        flight = worker.in_flight_prefill  # done when the step in flight ends, which `busy_s` prices
        prefilling: list[tuple[RequestState, int]] = []
        held, left = [], []  # the promised ones' KV tokens now and to come: the memory they will need
        for r in mine:  # one pass: this runs for every worker on every call
            if r.phase in ("prefill", "decode"):
                if r.best_effort:
                    best_effort += r.reserved_blocks
                else:
                    held.append(r.prompt_len + r.num_output)
                    left.append(r.output_left())
            if r.phase == "prefill":
                ran = flight.get(r.request_id, 0)
                if r.prefill_left > ran:
                    prefilling.append((r, ran))
                    continue
                if worker.role == "prefill":
                    continue
            elif r.phase != "decode":
                continue
            running += 1  # decoding, or from the next step on: its prompt ends in the step in flight
            context += r.prompt_len + r.num_output
            tpot = None if r.best_effort else r.tpot_s
            if tpot is not None:
                tpots.append(tpot)
            if tightest is None or (tpot is not None and tpot < tightest_tpot):
                tightest, tightest_tpot = r, math.inf if tpot is None else tpot
        free = load[worker.worker_id][0] + best_effort  # best-effort requests make room when asked
        shape = self.profile.model  # the same whatever the worker's calibration
        jobs = Jobs.of([Job(r.request_id, r.prefill_left - ran, 0, _deadline(r, now), r.tpot_s, True, r.life_context(),
                            float(prefill_cost(shape, r.prefill_left - ran, r.num_computed + ran)),
                            r.num_computed + ran, acceptance(state, r.slo_class, self.prior_alpha))
                        for r, ran in prefilling])
        profile = self._profile(worker)
        passed: list[str] = []  # beyond what one call plans (`earliest`): cut here, before pricing
        if candidates.any():
            picked = np.flatnonzero(candidates)
            past = rows.parked[picked] & (rows.deadline[picked] < now)
            deadline = np.where(past, np.inf, rows.deadline[picked])
            first = earliest(deadline)
            passed = rows.ids[picked[~first]].tolist()
            picked, past, deadline = picked[first], past[first], deadline[first]
            if worker.role == "prefill":
                blocks = -(-rows.prefill[picked] // worker.block_size)
            else:
                blocks, free = promise_blocks(np.array(held, dtype=np.int64), np.array(left, dtype=np.int64),
                                              rows.held[picked], rows.output[picked],
                                              -(-rows.whole[picked] // worker.block_size), free, worker.num_blocks,
                                              worker.block_size)
            by_class = np.array([acceptance(state, c, self.prior_alpha) for c in rows.classes])
            jobs += Jobs(rows.ids[picked], rows.prefill[picked], blocks, deadline,
                         np.where(past, np.nan, rows.tpot[picked]), np.zeros(len(picked), dtype=bool),
                         rows.context[picked], np.zeros(len(picked), dtype=np.int64), by_class[rows.klass[picked]],
                         prefill_cost(shape, rows.prefill[picked]))
        replica = Replica(
            decoding=running,
            context_tokens=context,
            tightest_tpot_s=None if math.isinf(tightest_tpot) else tightest_tpot,
            free_blocks=free,
            max_num_seqs=self.max_num_seqs,
            prefill_only=worker.role == "prefill",
            max_new=self._decode_slots(state) if worker.role == "prefill" else None,
            alpha=acceptance(state, tightest.slo_class if tightest else None, self.prior_alpha),
            max_spec_len=0 if worker.speculator == "none" else self.max_spec_len,
            draft=self.draft if worker.speculator == "draft" else None,
            busy_s=self._in_flight_s(worker, now),
            decode_tpots=tuple(tpots),
        )
        due = jobs.deadline - self.front_end_s
        reserved = np.minimum(due, now + (1.0 - self.ttft_reserve) * (due - now))
        p = plan(profile, replica, dataclasses.replace(jobs, deadline=reserved), now)
        if p.late:  # a promise is not broken for the reserve: the ones made are kept to their own deadlines
            own = np.where(jobs.promised, np.where(due > now, due, jobs.deadline), reserved)
            p = plan(profile, replica, dataclasses.replace(jobs, deadline=own), now)
        p.rejected += passed
        return p

    def _in_flight_s(self, worker: WorkerState, now: float) -> float:
        """What the worker's step in flight has left to run, priced as a promise is: at the
        worker's fitted time and margin for the step it was ordered (a whole step of the
        loop's turnaround when the order had no batch)."""
        if worker.step_in_flight is None:
            return 0.0
        parts = worker.order_parts or (0.0, 0.0, 0.0)
        return max(0.0, worker.order_sent_at + worker.fit.margin * worker.fit.predict(*parts) - now)

    def _profile(self, worker: WorkerState) -> Profile:
        """The performance model as this worker's steps have been running lately, at the
        margin a promise needs (`planner.calibration`)."""
        return worker.fit.priced(self.profile)

    def _spec_lens(self, state: PlannerState, worker: WorkerState, decode: list[str], step_s: float,
                   k_tight: int, catch_up: bool = True) -> dict[str, int]:
        """`speculation.spec_lens`, for a worker that speculates. When the tightest tier does
        not (k_tight 0), the period is its TPOT, which every other request's TPOT allows as
        well: none speculates."""
        if worker.speculator == "none" or not self.max_spec_len or not k_tight:
            return {}
        return spec_lens(state, decode, step_s, self.max_spec_len, self.prior_alpha, catch_up)

    def _decode_period(self, state: PlannerState, worker: WorkerState, decode: list[str]) -> tuple[float, int]:
        """A decode worker's step: paced by its tightest TPOT, speculating as that tier's plan says."""
        reqs = [state.requests[r] for r in decode]
        tightest = min(reqs, key=lambda r: r.tpot_s or math.inf, default=None)
        if tightest is None or tightest.tpot_s is None:
            return math.inf, 0
        replica = Replica(decoding=len(reqs), context_tokens=sum(r.prompt_len + r.num_output for r in reqs),
                          tightest_tpot_s=tightest.tpot_s, free_blocks=0, max_num_seqs=self.max_num_seqs,
                          alpha=acceptance(state, tightest.slo_class, self.prior_alpha),
                          max_spec_len=0 if worker.speculator == "none" else self.max_spec_len,
                          draft=self.draft if worker.speculator == "draft" else None,
                          decode_tpots=tuple(t for t in (r.tpot_s for r in reqs) if t is not None))
        p = plan(self._profile(worker), replica, [], 0.0)
        return p.step_s, p.spec_len

    def _decode_room(self, state: PlannerState, worker: WorkerState, count: int, tpot_s: float | None) -> int:
        """How many more requests a decode worker holding `count` can take at TPOT `tpot_s`."""
        reqs = [state.requests[r] for r in worker.requests]
        tpots = [t for t in (r.tpot_s for r in reqs) if t is not None] + ([tpot_s] if tpot_s else [])
        context = sum(r.prompt_len + r.num_output for r in reqs) / len(reqs) if reqs else DEFAULT_CONTEXT
        return max_decode_batch(self._profile(worker), context, min(tpots, default=None), self.max_num_seqs) - count

    def _accepts(self, state: PlannerState, worker: WorkerState, count: int, req: RequestState) -> bool:
        """Whether a decode worker holding `count` takes a prefilled request over: where its
        TPOT is kept beside the others'; or, for a TPOT the worker could not keep for it even
        alone (a promise made before the workers were known), wherever there is room, since
        waiting for a worker that keeps it would be waiting forever."""
        if self._decode_room(state, worker, count, req.tpot_s) > 0:
            return True
        alone = max_decode_batch(self._profile(worker), req.prompt_len + req.num_output, req.tpot_s, 1)
        return alone < 1 and self._decode_room(state, worker, count, None) > 0

    def _decode_slots(self, state: PlannerState) -> int:
        """Requests the decode pool can still take beside those it holds and those on their way."""
        pool = decode_pool(state)
        on_the_way = sum(1 for w in state.workers.values() if w.role == "prefill" for rid in w.requests
                         if state.requests[rid].phase in ("prefill", "handover"))
        return max(0, sum(max(0, self._decode_room(state, w, len(w.requests), None)) for w in pool) - on_the_way)


def _behind(req: RequestState) -> bool:
    """A promised request whose tokens so far run behind its TPOT: the batches beside it
    prefill only what the plan needs, and it speculates more where the worker speculates
    (and that leaves the plan's prefill room)."""
    return req.tpot_s is not None and req.tracker.lag_s() > 0.0


def _tightest(state: PlannerState, request_ids: list[str]) -> float | None:
    """The tightest TPOT among these requests (admitted this call: not yet on their worker,
    whose room for best-effort decoders must keep it too); None for none."""
    return min((t for t in (state.requests[r].tpot_s for r in request_ids) if t is not None), default=None)


def _deadline(req: RequestState, now: float) -> float:
    """A parked request past its TTFT has no deadline left."""
    return math.inf if req.parked and req.deadline < now else req.deadline


def _most_ahead_first(req: RequestState) -> tuple[bool, float, float]:
    """The order of preemption: best-effort requests, then those furthest ahead of their TPOT,
    whom the pause costs least (their token times go on when they are sent again), the newest
    among equals."""
    return not req.best_effort, req.tracker.lag_s(), -req.arrival


def _backlog(state: PlannerState, worker: WorkerState) -> int:
    """Prompt tokens the worker still has to prefill."""
    return sum(r.prefill_left for r in map(state.requests.__getitem__, worker.requests) if r.phase == "prefill")
