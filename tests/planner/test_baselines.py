"""The baseline policies on hand-built states: first come first served (prefill first),
Sarathi (chunked prefill, decode first) and EDF with early rejection."""

from __future__ import annotations

import pytest

from planner.policies.edf import EDFPolicy
from planner.policies.fcfs import FCFSPolicy
from planner.policies.sarathi import SarathiPolicy
from planner.state import PlannerState, RequestState, WorkerState
from shared.messages import SamplingParams
from shared.roofline import ModelShape, Profile, RooflineParams
from shared.slo import SLOTarget

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))


def worker(wid: str, blocks: int = 100, block_size: int = 16) -> WorkerState:
    return WorkerState(wid, "colocated", blocks, block_size, 2048, last_seen=0.0)


def request(rid: str, prompt: int, max_tokens: int = 16, arrival: float = 0.0,
            slo: SLOTarget = SLOTarget()) -> RequestState:
    return RequestState(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), slo, arrival)


def state_with(workers: list[WorkerState], requests: list[RequestState]) -> PlannerState:
    s = PlannerState()
    s.workers = {w.worker_id: w for w in workers}
    s.requests = {r.request_id: r for r in requests}
    for r in requests:
        s.waiting.add(r)
    return s


@pytest.mark.parametrize("policy", [FCFSPolicy(max_batch_tokens=1000), SarathiPolicy(max_batch_tokens=1000)])
def test_places_on_the_worker_with_most_room_in_arrival_order(policy: FCFSPolicy | SarathiPolicy) -> None:
    w0, w1 = worker("w0", blocks=100), worker("w1", blocks=60)
    s = state_with([w0, w1], [request("a", 320, 0), request("b", 16, 0), request("c", 16, 0)])
    d = policy.schedule(s, now=0.0)
    # a takes 20 of w0's 100 blocks, leaving 80 > 60: b goes to w0 too, then c as well.
    assert d.assign == {"a": "w0", "b": "w0", "c": "w0"}
    assert set(d.batches) == {"w0"}
    assert d.batches["w0"].prefill == [("a", 320), ("b", 16), ("c", 16)]


def test_head_of_line_blocks_when_the_head_does_not_fit() -> None:
    w0 = worker("w0", blocks=10)
    w0.reserved_blocks = 5
    s = state_with([w0], [request("big", 100, 0), request("small", 8, 0)])
    d = SarathiPolicy().schedule(s, now=0.0)
    assert d.assign == {} and d.refuse == []


def test_refuses_what_no_worker_could_ever_hold() -> None:
    s = state_with([worker("w0", blocks=4)], [request("huge", 100, 0), request("ok", 8, 0)])
    d = FCFSPolicy().schedule(s, now=0.0)
    assert [rid for rid, _ in d.refuse] == ["huge"]
    assert d.assign == {"ok": "w0"}


def busy_worker() -> PlannerState:
    """Three requests decoding, one half prefilled, one new."""
    w0 = worker("w0")
    running = [request(f"d{i}", 8) for i in range(3)]
    for r in running:
        r.phase, r.worker_id, r.num_computed = "decode", "w0", 8
    partial = request("p", 100, arrival=1.0)
    partial.phase, partial.worker_id, partial.num_computed = "prefill", "w0", 40
    w0.requests = [r.request_id for r in running] + ["p"]
    s = state_with([w0], [])
    s.requests = {r.request_id: r for r in [*running, partial, request("new", 50, arrival=2.0)]}
    s.waiting.add(s.requests["new"])
    return s


def test_sarathi_decodes_everything_then_chunks_prefill_within_the_budget() -> None:
    batch = SarathiPolicy(max_batch_tokens=70).schedule(busy_worker(), now=3.0).batches["w0"]
    assert batch.decode == ["d0", "d1", "d2"]
    assert batch.prefill == [("p", 60), ("new", 7)]


def test_fcfs_prefills_whole_prompts_first_and_stalls_decoding() -> None:
    batch = FCFSPolicy(max_batch_tokens=70).schedule(busy_worker(), now=3.0).batches["w0"]
    assert batch.decode == [] and batch.prefill == [("p", 60)]  # "new" does not fit beside it
    batch = FCFSPolicy(max_batch_tokens=30).schedule(busy_worker(), now=3.0).batches["w0"]
    assert batch.prefill == [("p", 60)]  # a prompt over the cap runs alone


def test_edf_refuses_early_what_cannot_meet_its_deadline_and_orders_by_deadline() -> None:
    s = state_with([worker("w0", blocks=1000)], [])
    reqs = [request("late", 50, arrival=0.0, slo=SLOTarget(ttft_ms=100.0)),
            request("loose", 200, arrival=0.5, slo=SLOTarget(ttft_ms=5000.0)),
            request("tight", 200, arrival=0.9, slo=SLOTarget(ttft_ms=1000.0)),
            request("impossible", 1_000_000, arrival=0.9, slo=SLOTarget(ttft_ms=150.0))]
    s.requests = {r.request_id: r for r in reqs}
    for r in reqs:
        s.waiting.add(r)
    s.workers["w0"].num_blocks = 100_000
    d = EDFPolicy(GPU, max_batch_tokens=300).schedule(s, now=1.0)
    refused = dict(d.refuse)
    assert set(refused) == {"late", "impossible"}
    assert "passed" in refused["late"] and "cannot" in refused["impossible"] or "no worker" in refused["impossible"]
    assert d.assign == {"tight": "w0", "loose": "w0"}
    assert d.batches["w0"].prefill == [("tight", 200), ("loose", 100)]


def test_busy_workers_get_no_batch() -> None:
    w0 = worker("w0")
    w0.step_in_flight = 4
    s = state_with([w0], [request("a", 8)])
    d = FCFSPolicy().schedule(s, now=0.0)
    assert d.assign == {"a": "w0"} and d.batches == {}


def test_max_num_seqs_caps_placement() -> None:
    s = state_with([worker("w0")], [request(f"r{i}", 4) for i in range(5)])
    d = FCFSPolicy(max_num_seqs=3).schedule(s, now=0.0)
    assert list(d.assign) == ["r0", "r1", "r2"]


def test_prefilled_requests_wait_for_a_decode_worker_to_join() -> None:
    state = state_with([WorkerState("p0", "prefill", 64, 16, 2048, last_seen=0.0)], [request("r", prompt=20)])
    decisions = FCFSPolicy().schedule(state, 0.0)
    assert decisions.refuse == [] and decisions.assign == {"r": "p0"}
