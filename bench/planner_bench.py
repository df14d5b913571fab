"""`slos-serve bench planner`: how long one scheduling call takes with many requests queued.

One replica on the A100 Llama-2-7B profile, with the KV cache an 80 GB GPU holds beside the
weights (`bench.experiments.kv_blocks`, about 7,000 blocks of 16 tokens), has 64 requests
decoding (TPOTs of 50, 100 and 200 ms) and N waiting: prompts of 16-2,047 tokens, TTFT deadlines over the next 30 s, the same
three TPOT tiers; nine in ten are parked from earlier calls, as they would be in an overload.
Each call is timed twice over: the admission plan alone (`planner.admission.plan`, the
dynamic program) and the whole SLO policy call (routing, plan, parking, batch formation,
speculative lengths). A tenth of the queue is drawn afresh between calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.experiments import kv_blocks
from planner.calibration import StepFit
from planner.core import quiet_gc
from planner.policies.slos import SLOPolicy
from planner.state import PlannerState, RequestState, WorkerState
from shared.messages import SamplingParams
from shared.roofline import Profile
from shared.slo import SLOTarget

TPOTS_MS = (50.0, 100.0, 200.0)


@dataclass
class Timings:
    plan_s: np.ndarray  # the admission plan alone, per call
    call_s: np.ndarray  # the whole policy call
    admitted: float  # share of the queue admitted at the last call


def _request(rng: np.random.Generator, rid: str, prompt: int) -> RequestState:
    slo = SLOTarget(float(rng.uniform(200, 30_000)), float(rng.choice(TPOTS_MS)))
    return RequestState(rid, (1,) * prompt, SamplingParams(max_tokens=256), slo, 0.0, expected_output=256)


def _state(rng: np.random.Generator, queued: int, blocks: int) -> PlannerState:
    state = PlannerState()
    worker = state.workers["w0"] = WorkerState("w0", "colocated", blocks, 16, 8192, 0.0, fit=StepFit(margin=1.0))
    for i in range(64):
        req = _request(rng, f"d{i}", 800)
        req.worker_id, req.phase, req.num_computed, req.num_output = "w0", "decode", 800, 10
        req.reserved_blocks = worker.blocks_for(req.tokens_on("colocated"))
        worker.reserved_blocks += req.reserved_blocks
        worker.requests.append(req.request_id)
        state.requests[req.request_id] = req
    for i in range(queued):
        _enqueue(state, _request(rng, f"q{i}", int(rng.integers(16, 2048))), parked=i % 10 != 0)
    return state


def _enqueue(state: PlannerState, req: RequestState, parked: bool) -> None:
    req.parked = parked
    state.requests[req.request_id] = req
    state.waiting.add(req)


def call_times(profile: Profile, queued: int, calls: int, seed: int = 0) -> Timings:
    rng = np.random.default_rng(seed)
    state = _state(rng, queued, kv_blocks(profile))
    quiet_gc()  # as the planner process does
    policy = SLOPolicy(profile, max_num_seqs=256, best_effort_limit=queued)
    worker = state.workers["w0"]
    plan_s, call_s, admitted, fresh = [], [], 0, queued
    for c in range(calls):
        for rid in list(state.waiting)[: queued // 10]:
            state.waiting.discard(rid)
            del state.requests[rid]
        for _ in range(queued // 10):
            _enqueue(state, _request(rng, f"q{fresh}", int(rng.integers(16, 2048))), parked=False)
            fresh += 1
        now = c * 0.02
        rows = state.waiting.rows()
        start = time.perf_counter()
        policy._plan(state, worker, {"w0": (worker.unreserved_blocks, len(worker.requests))}, rows,
                     np.ones(len(rows), dtype=bool), now, set())
        plan_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decisions = policy.schedule(state, now)
        call_s.append(time.perf_counter() - start)
        for rid, _ in decisions.park:  # as the planner's state machine does
            state.requests[rid].parked = True
            state.waiting.park(rid)
        admitted = len(decisions.assign)
    return Timings(np.array(plan_s), np.array(call_s), admitted / queued)
