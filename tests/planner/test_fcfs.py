from __future__ import annotations

from planner.policies.fcfs import FCFSPolicy
from planner.state import PlannerState, RequestState, WorkerState
from shared.messages import SamplingParams
from shared.slo import SLOTarget


def worker(wid: str, blocks: int = 100, block_size: int = 16) -> WorkerState:
    return WorkerState(wid, "colocated", blocks, block_size, 2048, last_seen=0.0)


def request(rid: str, prompt: int, max_tokens: int = 16, arrival: float = 0.0) -> RequestState:
    return RequestState(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), SLOTarget(), arrival)


def state_with(workers: list[WorkerState], requests: list[RequestState]) -> PlannerState:
    s = PlannerState()
    s.workers = {w.worker_id: w for w in workers}
    s.requests = {r.request_id: r for r in requests}
    s.waiting = [r.request_id for r in requests]
    return s


def test_places_on_the_worker_with_most_room_in_arrival_order() -> None:
    w0, w1 = worker("w0", blocks=100), worker("w1", blocks=60)
    s = state_with([w0, w1], [request("a", 320, 0), request("b", 16, 0), request("c", 16, 0)])
    d = FCFSPolicy(max_batch_tokens=1000).schedule(s, now=0.0)
    # a takes 20 of w0's 100 blocks, leaving 80 > 60: b goes to w0 too, then c as well.
    assert d.assign == {"a": "w0", "b": "w0", "c": "w0"}
    assert set(d.batches) == {"w0"}
    assert d.batches["w0"].prefill == [("a", 320), ("b", 16), ("c", 16)]


def test_head_of_line_blocks_when_the_head_does_not_fit() -> None:
    w0 = worker("w0", blocks=10)
    w0.reserved_blocks = 5
    s = state_with([w0], [request("big", 100, 0), request("small", 8, 0)])
    d = FCFSPolicy().schedule(s, now=0.0)
    assert d.assign == {} and d.refuse == []


def test_refuses_what_no_worker_could_ever_hold() -> None:
    s = state_with([worker("w0", blocks=4)], [request("huge", 100, 0), request("ok", 8, 0)])
    d = FCFSPolicy().schedule(s, now=0.0)
    assert [rid for rid, _ in d.refuse] == ["huge"]
    assert d.assign == {"ok": "w0"}


def test_decodes_everything_then_chunks_prefill_within_the_budget() -> None:
    w0 = worker("w0")
    running = [request(f"d{i}", 8) for i in range(3)]
    for r in running:
        r.phase, r.worker_id, r.num_computed = "decode", "w0", 8
    partial = request("p", 100, arrival=1.0)
    partial.phase, partial.worker_id, partial.num_computed = "prefill", "w0", 40
    w0.requests = [r.request_id for r in running] + ["p"]
    s = state_with([w0], [])
    s.requests = {r.request_id: r for r in [*running, partial, request("new", 50, arrival=2.0)]}
    s.waiting = ["new"]
    d = FCFSPolicy(max_batch_tokens=70).schedule(s, now=3.0)
    batch = d.batches["w0"]
    assert batch.decode == ["d0", "d1", "d2"]
    assert batch.prefill == [("p", 60), ("new", 7)]


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
