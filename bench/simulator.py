"""Discrete-event simulator: the planner's own code driven by a simulated clock.

The planner (`planner.core.Planner` with any policy) is fed exactly the messages it gets
live: submissions, worker hellos and step reports; its batch orders are executed by simulated
workers. A simulated worker runs an order like the engine does (aborts, KV imports, new
requests, prefill chunks, decode steps that may verify speculative tokens) and takes the time
the performance-model profile predicts for the batch's shape, plus the KV transfer of its
imports at the cluster's bandwidth; where the cluster is given a real worker's jitter, times a
random factor (which the planner sees as prediction error and plans below each TPOT for, as it
does live). Accepted speculative tokens are drawn per request from its acceptance rate.
Nothing about scheduling is decided here.

The simulated clients judge each request by its token times with `shared.slo.Tracker`, as the
live benchmarks do; a refused request, or one still unfinished at the end, missed its SLOs.
Tool-calling loops are chains: the next call of a loop arrives a think time after the
previous one finishes; if one is refused, or unfinished at the end, the calls after it never
go out and count as missed; if one misses its objectives, the calls after it still go out but
count as missed too (`bench.workloads.judge_loops`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from bench.workloads import Arrival, Outcome, attainment, attainment_by_class, every_request, judge_loops
from planner.core import Planner, quiet_gc
from planner.policies.base import Policy
from shared.clock import ManualClock
from shared.messages import (
    BatchOrder,
    ExportedRequest,
    KVEndpoint,
    Lost,
    Refused,
    RequestProgress,
    Role,
    SamplingParams,
    StepReport,
    Submit,
    WorkerHello,
)
from shared.resubmission import Resubmissions
from shared.roofline import Batches, Profile
from shared.slo import SLOClass, Tracker, resolve

TICK_S = 0.25  # the live planner wakes at least this often (worker heartbeats)


@dataclass(frozen=True)
class Cluster:
    profile: Profile
    num_blocks: int  # KV blocks per worker
    colocated: int = 1
    prefill: int = 0
    decode: int = 0
    block_size: int = 16
    max_model_len: int = 1 << 20
    speculator: str = "none"  # what decoding workers propose with: none, ngram or draft
    draft: Profile | None = None  # the draft model's cost, for speculator "draft"
    kv_bandwidth: float = 25e9  # bytes/s of a KV handover between workers
    planner_in_loop: bool = False  # orders start the planner's real compute time late (not deterministic)
    step_spread: float = 0.0  # σ of the log of a step's time over the profile's (a real worker's jitter); 0: exact
    front_s: float = 0.0  # a request reaches the planner this long after its client sends it (HTTP, gateway)

    @property
    def mode(self) -> str:
        return "disaggregated" if self.prefill or self.decode else "colocated"

    def roles(self) -> list[tuple[str, Role]]:
        return ([(f"w{i}", "colocated") for i in range(self.colocated if not self.prefill else 0)]
                + [(f"p{i}", "prefill") for i in range(self.prefill)]
                + [(f"d{i}", "decode") for i in range(self.decode)])


@dataclass
class SimResult:
    outcomes: list[Outcome]
    end: float  # simulated seconds
    planner_calls: int
    planner_s: float  # wall time spent in the planner
    stopped: bool = False  # given up once the attainment asked for was out of reach
    promises: dict[str, tuple[int, int]] = field(default_factory=dict)  # the planner's count: kind -> (met, total)
    busy_s: float = 0.0  # the workers' step time, summed over workers

    @property
    def attainment(self) -> float:
        return attainment(self.outcomes)

    def by_class(self) -> dict[str, float]:
        return attainment_by_class(self.outcomes)


@dataclass
class _Seq:
    prefill: int  # tokens to prefill: prompt, and output written before a resubmission
    computed: int
    output: int
    target: int  # output it writes before it stops
    max_tokens: int
    alpha: float
    blocks: int = 0


@dataclass
class _Client:
    arrival: Arrival
    tracker: Tracker
    submit: Submit
    refused: bool = False
    finished: bool = False
    output: int = 0
    late: bool = False  # a call before it in its tool loop missed: it misses too, and is counted already


class _Worker:
    def __init__(self, worker_id: str, role: Role, cluster: Cluster, rng: np.random.Generator) -> None:
        self.worker_id, self.role, self.cluster, self.rng = worker_id, role, cluster, rng
        self.seqs: dict[str, _Seq] = {}
        self.used = 0
        self.endpoint = KVEndpoint("zmq", worker_id, cluster.block_size * cluster.profile.model.kv_bytes_per_token)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cluster.block_size)

    def _grow(self, seq: _Seq, tokens: int) -> bool:
        need = self.blocks_for(tokens) - seq.blocks
        if need > 0 and self.used + need > self.cluster.num_blocks:
            return False
        if need > 0:
            seq.blocks += need
            self.used += need
        return True

    def _free(self, rid: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is not None:
            self.used -= seq.blocks

    def _shrink(self, seq: _Seq) -> None:
        keep = self.blocks_for(seq.computed)
        self.used -= seq.blocks - keep
        seq.blocks = keep

    def step(self, order: BatchOrder, truth: dict[str, tuple[int, float]]) -> tuple[float, StepReport, dict[str, int]]:
        """Run an order: its duration, its report, and the tokens each request got."""
        c = self.cluster
        if order.role is not None:
            self.role = order.role
        for rid in order.aborts:
            self._free(rid)
        transfer_s, failed = 0.0, []
        for export in order.kv_imports:
            target, alpha = truth[export.request_id]
            seq = _Seq(export.num_computed, 0, len(export.token_ids), target, export.params.max_tokens, alpha)
            if not self._grow(seq, export.num_computed):
                failed.append(export.request_id)
                continue
            seq.computed = export.num_computed
            self.seqs[export.request_id] = seq
            transfer_s += export.num_computed * c.profile.model.kv_bytes_per_token / c.kv_bandwidth
        for new in order.new_requests:
            target, alpha = truth[new.request_id]
            self.seqs[new.request_id] = _Seq(len(new.prompt_token_ids) + len(new.resume_token_ids), 0,
                                             len(new.resume_token_ids), target, new.params.max_tokens, alpha)
        progress: dict[str, RequestProgress] = {}
        tokens: dict[str, int] = {}
        out_of_blocks: list[str] = []
        exports: list[ExportedRequest] = []
        prefill_tokens = pairs = kv_read = 0
        for chunk in order.prefill:
            seq = self.seqs.get(chunk.request_id)
            if seq is None:
                continue
            n = min(chunk.num_tokens, seq.prefill - seq.computed)
            completes = seq.computed + n == seq.prefill
            if n <= 0 or not self._grow(seq, seq.computed + n + completes):
                out_of_blocks.append(chunk.request_id)
                continue
            prefill_tokens += n
            pairs += n * (seq.computed + n // 2)
            kv_read += seq.computed + n
            seq.computed += n
            if completes:
                seq.output += 1
                tokens[chunk.request_id] = 1
            progress[chunk.request_id] = RequestProgress(chunk.request_id, seq.computed, seq.output, None, 0, 0)
            if completes and self.role == "prefill" and not self._finished(seq):
                exports.append(ExportedRequest(chunk.request_id, [0] * seq.output, 0, seq.computed,
                                               SamplingParams(max_tokens=seq.max_tokens), [], self.endpoint))
        decode_seqs = verify = 0
        spec_seqs, draft_steps, draft_kv = 0, 0, 0
        spec_lens = order.spec_lens if c.speculator != "none" else {}
        random = self.rng.random
        for rid in order.decode:  # the hot loop of a simulation
            seq = self.seqs.get(rid)
            if seq is None:
                continue
            k = spec_lens.get(rid, 0)
            if k:
                k = max(0, min(k, min(seq.max_tokens, seq.target) - seq.output - 1))
            if not self._grow(seq, seq.computed + 1 + k):
                out_of_blocks.append(rid)
                continue
            accepted = 0
            while accepted < k and random() < seq.alpha:
                accepted += 1
            decode_seqs += 1
            verify += k + 1
            kv_read += seq.computed
            pairs += (k + 1) * seq.computed
            if k:
                spec_seqs += 1
                draft_steps = max(draft_steps, k)
                draft_kv += seq.computed
            new = accepted + 1
            seq.output += new
            seq.computed += new
            if k:  # without proposals the step grew it to just what it now holds
                self._shrink(seq)
            tokens[rid] = new
            progress[rid] = RequestProgress(rid, seq.computed, seq.output, None, k, accepted)
        for rid, p in progress.items():
            seq = self.seqs[rid]
            if self._finished(seq):
                finish = "stop" if seq.output >= seq.target else "length"
                progress[rid] = msgspec.structs.replace(p, finish_reason=finish)
                self._free(rid)
        seconds = transfer_s
        if prefill_tokens or decode_seqs:
            batch = Batches.of(prefill_tokens=prefill_tokens, decode_seqs=decode_seqs,
                               verify_len=verify / decode_seqs if decode_seqs else 1.0, kv_read=kv_read,
                               num_seqs=decode_seqs + len(order.prefill), attention_pairs=pairs)
            seconds += float(c.profile.predict(batch))
        if draft_steps and c.speculator == "draft" and c.draft is not None:
            seconds += draft_steps * float(c.draft.predict(Batches.of(decode_seqs=spec_seqs, kv_read=draft_kv,
                                                                     attention_pairs=draft_kv)))
        if c.step_spread:  # lognormal with mean one: the profile stays right on average
            seconds *= math.exp(self.rng.normal(-c.step_spread ** 2 / 2, c.step_spread))
        report = StepReport(self.worker_id, order.step_id, seconds, list(progress.values()), out_of_blocks,
                            c.num_blocks - self.used, exports, failed)
        return seconds, report, tokens

    @staticmethod
    def _finished(seq: _Seq) -> bool:
        return seq.output >= seq.target or seq.output >= seq.max_tokens


def simulate(policy: Policy, cluster: Cluster, arrivals: list[Arrival], classes: dict[str, SLOClass],
             seed: int = 0, drain_s: float = 600.0, stop_below: float | None = None) -> SimResult:
    """Run the workload to its end (or `drain_s` after the last arrival) and judge every request.

    With `stop_below`, stop as soon as so many requests have missed (refused, or finished off
    their SLOs) that the attainment cannot reach it; requests unfinished then count as missed,
    so the result stays below it. An overloaded run, the slowest to simulate, ends early."""
    rng = np.random.default_rng(seed)
    quiet_gc()
    clock = ManualClock()
    planner = Planner(policy, clock, classes, worker_timeout_s=math.inf, profile=cluster.profile)
    planner.state.mode = cluster.mode  # type: ignore[assignment]
    workers = {wid: _Worker(wid, role, cluster, rng) for wid, role in cluster.roles()}
    for i, (wid, role) in enumerate(cluster.roles()):
        planner.handle(WorkerHello(wid, role, cluster.num_blocks, cluster.block_size, cluster.max_model_len, i,
                                     "none" if role == "prefill" else cluster.speculator, workers[wid].endpoint))
    events: list[tuple[float, int, str, object]] = []
    counter = itertools.count()
    for a in arrivals:
        heapq.heappush(events, (a.at, next(counter), "arrive", a))
    clients: dict[str, _Client] = {}
    late_calls: dict[str, bool] = {}  # follow-up calls on their way: whether a call before them missed
    truth: dict[str, tuple[int, float]] = {}
    resubmissions = Resubmissions()
    in_flight: dict[str, tuple[StepReport, dict[str, int]]] = {}
    last_arrival = max((a.at for a in arrivals), default=0.0)
    calls, planner_s, busy_s = 0, 0.0, 0.0
    tick_pending = False
    missed, most_missed = 0, math.inf
    if stop_below is not None:
        most_missed = (1.0 - stop_below) * len(every_request(arrivals))

    def arrive(a: Arrival, now: float) -> None:
        spec = a.slo_spec()
        max_tokens = a.max_tokens or max(1, cluster.max_model_len - a.prompt_tokens - 1)
        submit = Submit(a.request_id, [0] * a.prompt_tokens, SamplingParams(max_tokens=max_tokens), spec, now)
        clients[a.request_id] = _Client(a, Tracker(resolve(spec, classes), now), submit,
                                        late=late_calls.pop(a.request_id, False))
        truth[a.request_id] = (a.output_tokens, a.alpha)
        if cluster.front_s:
            heapq.heappush(events, (now + cluster.front_s, next(counter), "submit", submit))
        else:
            handle(planner.handle(submit), now)

    def handle(messages: list, now: float) -> None:
        nonlocal missed
        for msg in messages:
            client = clients.get(getattr(msg, "request_id", ""))
            if client is None:
                continue
            if isinstance(msg, Refused):
                client.refused = True
                if not client.late:
                    missed += len(every_request([client.arrival]))  # and the calls of its loop left
            elif isinstance(msg, Lost):  # sent again after the tokens already streamed, as the gateway does
                again = resubmissions.again(client.submit, msg, [0] * client.output)
                if again is not None:  # otherwise the client gets an error: it stays unfinished
                    handle(planner.handle(again), now)

    while events:
        now = events[0][0]
        if now > last_arrival + drain_s or missed > most_missed:
            break
        clock.advance(now - clock.now())
        while events and events[0][0] <= now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                arrive(payload, now)  # type: ignore[arg-type]
            elif kind == "submit":
                handle(planner.handle(payload), now)  # type: ignore[arg-type]
            elif kind == "tick":
                tick_pending = False
            else:
                report, tokens = in_flight.pop(payload)  # type: ignore[arg-type]
                for rid, n in tokens.items():
                    client = clients[rid]
                    client.tracker.add(n, now)
                    client.output += n
                for p in report.progress:
                    if p.finish_reason is not None:
                        client = clients[p.request_id]
                        client.finished = True
                        follow = client.arrival.then
                        late = client.late or not client.tracker.met()
                        if late and not client.late:
                            missed += len(every_request([client.arrival]))  # and the calls of its loop left
                        if follow is not None:
                            heapq.heappush(events, (now + follow.at, next(counter), "arrive",
                                                    dataclasses.replace(follow, at=now + follow.at)))
                            late_calls[follow.request_id] = late
                handle(planner.handle(report), now)
        started = time.perf_counter()
        orders, verdicts = planner.schedule()
        elapsed = time.perf_counter() - started
        planner_s += elapsed
        calls += 1
        handle(verdicts, now)
        start = now + elapsed if cluster.planner_in_loop else now
        for wid, order in orders.items():
            seconds, report, tokens = workers[wid].step(order, truth)
            busy_s += seconds
            in_flight[wid] = (report, tokens)
            heapq.heappush(events, (start + seconds, next(counter), "done", wid))
        if not in_flight and planner.state.waiting and not tick_pending:
            heapq.heappush(events, (now + TICK_S, next(counter), "tick", None))
            tick_pending = True

    outcomes = [_outcome(c) for c in clients.values()]
    promises = {kind: (a.met, a.total) for kind, a in planner.state.promises.items()}
    return SimResult(judge_loops(outcomes, arrivals), clock.now(), calls, planner_s, missed > most_missed, promises,
                     busy_s)


def _outcome(c: _Client) -> Outcome:
    a = c.arrival
    met = c.finished and not c.refused and c.tracker.met()
    return Outcome(a.request_id, a.slo_class, c.tracker.arrival, a.prompt_tokens, c.output, c.refused, c.finished,
                   met, c.tracker.ttft_s, c.tracker.stage_tpots_s())
