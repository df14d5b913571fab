"""The planner's state transitions, driven by messages and a manual clock."""

from __future__ import annotations

import pytest

import planner.state
from planner.core import Planner
from planner.decisions import Decisions
from planner.policies.fcfs import FCFSPolicy
from planner.policies.slos import SLOPolicy
from shared.clock import ManualClock
from shared.messages import (
    Abort,
    Admitted,
    BatchOrder,
    ExportedRequest,
    GatewayHello,
    Heartbeat,
    KVEndpoint,
    Lost,
    Parked,
    PrefillChunk,
    Refused,
    RequestProgress,
    SamplingParams,
    SLOCount,
    SLOSpec,
    SpecCounts,
    StepReport,
    Submit,
    WorkerHello,
)
from shared.roofline import BUILTIN_CPU_PROFILE, load_profile
from shared.slo import DEFAULT_CLASSES

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def make() -> tuple[Planner, ManualClock]:
    clock = ManualClock()
    planner = Planner(FCFSPolicy(), clock, DEFAULT_CLASSES, worker_timeout_s=1.0)
    planner.on_hello(WorkerHello("w0", "colocated", 64, 16, 2048, 1))
    return planner, clock


def submit(planner: Planner, rid: str, prompt: int = 20, slo: SLOSpec = SLOSpec()) -> list:
    return planner.on_submit(Submit(rid, [1] * prompt, GREEDY, slo, 0.0))


def test_request_lifecycle_reserves_and_releases_blocks() -> None:
    planner, _ = make()
    assert submit(planner, "r") == []
    orders, verdicts = planner.schedule()
    assert verdicts == [Admitted("r")]
    order = orders["w0"]
    assert [n.request_id for n in order.new_requests] == ["r"]
    w0 = planner.state.workers["w0"]
    assert w0.reserved_blocks == 2 and w0.step_in_flight == order.step_id
    assert planner.schedule()[0] == {}  # busy until it reports
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    order = planner.schedule()[0]["w0"]
    assert order.decode == ["r"] and order.new_requests == []
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 21, 2, "stop")], [], 64))
    assert w0.reserved_blocks == 0 and not planner.state.requests


def test_unknown_slo_class_duplicates_and_empty_prompts_are_refused() -> None:
    planner, _ = make()
    [refused] = submit(planner, "r", slo=SLOSpec(slo_class="nope"))
    assert isinstance(refused, Refused) and "nope" in refused.reason
    submit(planner, "s")
    [dup] = submit(planner, "s")
    assert isinstance(dup, Refused)
    [empty] = submit(planner, "e", prompt=0)
    assert isinstance(empty, Refused) and "e" not in planner.state.requests


def test_requests_without_objectives_get_the_default_class_when_one_is_set() -> None:
    planner, _ = make()
    planner.default_class = "chatbot"
    submit(planner, "plain")
    submit(planner, "own", slo=SLOSpec(tpot_ms=500.0))  # objectives of its own: no class added
    plain, own = planner.state.requests["plain"], planner.state.requests["own"]
    assert plain.slo_class == "chatbot" and plain.slo == DEFAULT_CLASSES["chatbot"].target
    assert own.slo_class is None and own.slo.tpot_ms == 500.0 and own.slo.ttft_ms is None


def test_abort_of_a_delivered_request_reaches_the_worker() -> None:
    planner, _ = make()
    submit(planner, "r")
    order = planner.schedule()[0]["w0"]
    planner.on_abort(Abort("r"))
    assert planner.state.workers["w0"].reserved_blocks == 0
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    follow_up = planner.schedule()[0]["w0"]
    assert follow_up.aborts == ["r"] and not follow_up.decode


def test_a_new_gateway_aborts_what_the_one_before_it_asked_for() -> None:
    planner, _ = make()
    planner.on_gateway_hello(GatewayHello("g1"))
    submit(planner, "running")
    order = planner.schedule()[0]["w0"]
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("running", 20, 1)], [], 60))
    submit(planner, "waiting")
    planner.on_gateway_hello(GatewayHello("g1"))  # the same gateway again: nothing happens
    assert set(planner.state.requests) == {"running", "waiting"}
    planner.on_gateway_hello(GatewayHello("g2"))
    assert not planner.state.requests and not planner.state.waiting
    assert planner.state.workers["w0"].reserved_blocks == 0
    assert planner.schedule()[0]["w0"].aborts == ["running"]


def test_after_a_planner_restart_a_request_it_has_already_is_not_a_duplicate() -> None:
    planner, _ = make()
    submit(planner, "r")
    assert planner.on_submit(Submit("r", [1] * 20, GREEDY, SLOSpec(), 0.0, after_restart=True)) == []
    assert planner.on_submit(Submit("s", [1] * 20, GREEDY, SLOSpec(), 0.0, [5, 6], after_restart=True)) == []
    assert planner.state.requests["s"].resume_token_ids == (5, 6)
    assert planner.status(0).planner_id == planner.planner_id != make()[0].planner_id


def test_abort_of_a_waiting_request_needs_no_worker() -> None:
    planner, _ = make()
    planner.state.workers["w0"].step_in_flight = 99
    submit(planner, "r")
    planner.on_abort(Abort("r"))
    assert not planner.state.waiting and planner.pending_aborts == {}


def test_silent_worker_is_declared_dead_and_its_requests_are_lost() -> None:
    planner, clock = make()
    submit(planner, "r")
    planner.schedule()
    clock.advance(0.5)
    planner.on_heartbeat(Heartbeat("w0", 60))
    clock.advance(0.9)
    assert planner.check_workers() == []
    clock.advance(0.2)
    assert planner.check_workers() == [Lost("r", "worker w0 died")]  # the gateway resubmits it
    assert "w0" not in planner.state.workers and not planner.state.requests


def test_reports_from_strangers_are_ignored() -> None:
    planner, _ = make()
    planner.on_report(StepReport("ghost", 1, 0.0, [], [], 0))
    planner.on_report(StepReport("w0", 12345, 0.0, [], [], 0))
    assert planner.state.workers["w0"].step_in_flight is None


def test_speculative_length_is_ordered_and_acceptance_counted_per_class() -> None:
    clock = ManualClock()
    planner = Planner(FCFSPolicy(spec_len=3), clock, DEFAULT_CLASSES, worker_timeout_s=1.0)
    planner.on_hello(WorkerHello("spec", "colocated", 64, 16, 2048, 1, speculator="ngram"))
    submit(planner, "r", slo=SLOSpec(slo_class="coding"))
    order = planner.schedule()[0]["spec"]
    assert order.spec_lens == {}  # prefill only
    planner.on_report(StepReport("spec", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    order = planner.schedule()[0]["spec"]
    assert order.decode == ["r"] and order.spec_lens == {"r": 3}
    planner.on_report(StepReport("spec", order.step_id, 0.01, [RequestProgress("r", 22, 3, None, 3, 2)], [], 60))
    assert planner.status(0).speculation == {"coding": SpecCounts(3, 2, steps=1, rejected=1)}

    plain = Planner(FCFSPolicy(spec_len=3), clock, DEFAULT_CLASSES, worker_timeout_s=1.0)
    plain.on_hello(WorkerHello("w0", "colocated", 64, 16, 2048, 1))  # cannot speculate: never asked to
    submit(plain, "r")
    order = plain.schedule()[0]["w0"]
    plain.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    assert plain.schedule()[0]["w0"].spec_lens == {}


def test_disaggregated_handover_moves_the_reservation_and_frees_the_source() -> None:
    planner = Planner(FCFSPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=1.0)
    endpoint = KVEndpoint("zmq", "p0", [64], zmq_address="tcp://127.0.0.1:1")
    planner.on_hello(WorkerHello("p0", "prefill", 64, 16, 2048, 1, kv_endpoint=endpoint))
    planner.on_hello(WorkerHello("d0", "decode", 64, 16, 2048, 2))
    planner.on_hello(WorkerHello("d1", "decode", 8, 16, 2048, 3))
    submit(planner, "r", prompt=20)  # GREEDY: 4 new tokens, so 24 tokens: 2 blocks
    order = planner.schedule()[0]["p0"]
    p0, d0, d1 = (planner.state.workers[w] for w in ("p0", "d0", "d1"))
    assert order.prefill == [PrefillChunk("r", 20)] and p0.reserved_blocks == 2  # the prompt only
    export = ExportedRequest("r", [1] * 20 + [7], 20, 20, GREEDY, [0, 1], endpoint)
    planner.on_report(StepReport("p0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 62, [export]))
    orders = planner.schedule()[0]
    assert set(orders) == {"d0"}  # the decode worker with the most room
    assert orders["d0"].kv_imports == [export] and orders["d0"].decode == ["r"]
    assert d0.reserved_blocks == 2 and p0.reserved_blocks == 2 and d1.reserved_blocks == 0

    planner.on_hello(WorkerHello("d0", "decode", 64, 16, 2048, 4))  # d0 restarted mid-transfer
    assert planner.state.requests["r"].phase == "handover"
    orders = planner.schedule()[0]
    assert orders["d0"].kv_imports == [export]
    planner.on_report(StepReport("d0", orders["d0"].step_id, 0.01, [RequestProgress("r", 21, 2)], [], 62))
    assert planner.state.requests["r"].worker_id == "d0" and p0.reserved_blocks == 0
    orders = planner.schedule()[0]
    assert orders["p0"].aborts == ["r"]  # the source frees its copy
    assert orders["d0"].decode == ["r"] and orders["d0"].kv_imports == []
    planner.on_report(StepReport("d0", orders["d0"].step_id, 0.01, [RequestProgress("r", 23, 4, "length")], [], 64))
    assert not planner.state.requests and planner.state.workers["d0"].reserved_blocks == 0
    assert planner.handovers == 1


def test_a_failed_kv_import_is_lost_and_freed_on_both_sides() -> None:
    planner = Planner(FCFSPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=1.0)
    endpoint = KVEndpoint("zmq", "p0", [64], zmq_address="tcp://127.0.0.1:1")
    planner.on_hello(WorkerHello("p0", "prefill", 64, 16, 2048, 1, kv_endpoint=endpoint))
    planner.on_hello(WorkerHello("d0", "decode", 64, 16, 2048, 2))
    submit(planner, "r", prompt=20)
    order = planner.schedule()[0]["p0"]
    export = ExportedRequest("r", [1] * 21, 20, 20, GREEDY, [0, 1], endpoint)
    planner.on_report(StepReport("p0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 62, [export]))
    order = planner.schedule()[0]["d0"]
    lost = planner.on_report(StepReport("d0", order.step_id, 0.01, [], [], 64, failed_imports=["r"]))
    assert lost == [Lost("r", "KV import on d0 failed")]
    assert not planner.state.requests
    assert all(w.reserved_blocks == 0 and not w.requests for w in planner.state.workers.values())
    assert planner.schedule()[0]["p0"].aborts == ["r"]  # the prefill worker frees its copy


def test_verdicts_reach_the_gateway_and_the_admin_can_ask_why() -> None:
    planner, _ = make()
    for rid in ("a", "b", "c"):
        submit(planner, rid, slo=SLOSpec(slo_class="coding"))
    out = planner._apply(Decisions(assign={"a": "w0"}, park=[("b", "no room")], refuse=[("c", "full")]))
    assert out == [Refused("c", "full", 1.0), Parked("b", "no room"), Admitted("a")]
    assert planner.explain("b") == "parked: no room" and planner.explain("c") == "refused: full"
    assert planner.explain("a").startswith("admitted to worker w0")
    assert planner.state.requests["b"].parked and planner.state.attainment["coding"].total == 1  # the refusal


def test_preemption_frees_the_worker_and_the_gateway_resumes_the_stream() -> None:
    planner, _ = make()
    submit(planner, "r")
    order = planner.schedule()[0]["w0"]
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    out = planner._apply(Decisions(preempt=[("r", "room for promised work")]))
    assert out == [Lost("r", "room for promised work", preempted=True)]
    assert planner.preemptions == 1 and not planner.state.requests
    assert planner.state.workers["w0"].reserved_blocks == 0
    assert planner.schedule()[0]["w0"].aborts == ["r"]


def test_a_preempted_request_sent_again_goes_on_with_its_token_times() -> None:
    """The pause counts against its TPOT, as its client sees it: the planner knows it is now
    behind (it speculates to catch up, and is not the first to be preempted again), and its
    first token is not due again."""
    planner, clock = make()
    slo = SLOSpec(ttft_ms=500.0, tpot_ms=50.0)
    submit(planner, "r", slo=slo)
    order = planner.schedule()[0]["w0"]
    clock.advance(0.1)
    planner.on_report(StepReport("w0", order.step_id, 0.1, [RequestProgress("r", 20, 1)], [], 60))
    order = planner.schedule()[0]["w0"]
    clock.advance(0.04)
    planner.on_report(StepReport("w0", order.step_id, 0.04, [RequestProgress("r", 21, 2)], [], 60))
    planner._apply(Decisions(preempt=[("r", "room")]))
    clock.advance(1.0)
    planner.on_submit(Submit("r", [1] * 20, GREEDY, slo, 0.0, resume_token_ids=[7, 8]))
    again = planner.state.requests["r"]
    assert again.tracker.ttft_s == pytest.approx(0.1) and again.deadline == float("inf")
    assert again.tracker.lag_s() == pytest.approx(-0.01)  # one gap, 10 ms under its TPOT, so far
    order = planner.schedule()[0]["w0"]
    clock.advance(0.05)
    planner.on_report(StepReport("w0", order.step_id, 0.05, [RequestProgress("r", 23, 3)], [], 60))
    assert again.tracker.lag_s() == pytest.approx(0.04 + 1.05 - 2 * 0.05)  # the pause is in its gaps
    assert not planner.lost


def test_a_best_effort_request_sent_again_comes_back_best_effort_not_as_a_new_promise() -> None:
    """Seen in the simulator: a request served best effort, preempted and sent again, was
    promised anew with its first token long past due, and counted as a broken promise."""
    planner, clock = make()
    submit(planner, "r", slo=SLOSpec(ttft_ms=500.0, tpot_ms=50.0))
    order = planner.schedule()[0]["w0"]
    planner.state.requests["r"].best_effort = True
    assert planner.state.workers["w0"].in_flight_prefill == {"r": 20}  # planned as done while it runs
    clock.advance(0.1)
    planner.on_report(StepReport("w0", order.step_id, 0.1, [RequestProgress("r", 20, 1)], [], 60))
    assert planner.state.workers["w0"].in_flight_prefill == {}
    planner._apply(Decisions(preempt=[("r", "room")]))
    planner.on_submit(Submit("r", [1] * 20, GREEDY, SLOSpec(ttft_ms=500.0, tpot_ms=50.0), 0.0, resume_token_ids=[7]))
    again = planner.state.requests["r"]
    assert again.best_effort and again.parked and again.tpot_s is None


def test_a_request_lost_before_its_first_token_is_still_due_when_it_was() -> None:
    planner, clock = make()
    slo = SLOSpec(ttft_ms=500.0)
    submit(planner, "r", slo=slo)
    planner.schedule()
    planner._apply(Decisions(preempt=[("r", "room")]))
    clock.advance(0.3)
    planner.on_submit(Submit("r", [1] * 20, GREEDY, slo, 0.0))
    assert planner.state.requests["r"].deadline == pytest.approx(0.5)


def test_attainment_counts_what_met_its_slos_by_the_planners_clock() -> None:
    planner, clock = make()
    submit(planner, "fast", slo=SLOSpec(ttft_ms=100.0, tpot_ms=50.0))
    submit(planner, "slow", slo=SLOSpec(ttft_ms=100.0, tpot_ms=50.0))
    order = planner.schedule()[0]["w0"]
    clock.advance(0.05)
    planner.on_report(StepReport("w0", order.step_id, 0.05, [RequestProgress("fast", 20, 1),
                                                             RequestProgress("slow", 20, 1)], [], 60))
    order = planner.schedule()[0]["w0"]
    clock.advance(0.04)
    planner.on_report(StepReport("w0", order.step_id, 0.04, [RequestProgress("fast", 21, 2, "length"),
                                                             RequestProgress("slow", 21, 2)], [], 60))
    order = planner.schedule()[0]["w0"]
    clock.advance(0.2)
    planner.on_report(StepReport("w0", order.step_id, 0.2, [RequestProgress("slow", 22, 3, "length")], [], 64))
    assert planner.status(0).attainment == {"default": SLOCount(met=1, total=2)}


def preempted_mid_step(planner: Planner) -> BatchOrder:
    """r decodes; while its decode step is in flight it is preempted and resubmitted after its
    one streamed token. Returns the order of that step."""
    submit(planner, "r")
    order = planner.schedule()[0]["w0"]
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    order = planner.schedule()[0]["w0"]
    planner._apply(Decisions(preempt=[("r", "room")]))
    planner.on_submit(Submit("r", [1] * 20, GREEDY, SLOSpec(), 0.0, resume_token_ids=[7]))
    return order


def test_a_step_that_ran_before_a_preemption_does_not_touch_the_resubmitted_request() -> None:
    planner, _ = make()
    order = preempted_mid_step(planner)
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 21, 2, "length")], [], 60))
    again = planner.state.requests["r"]
    assert again.phase == "waiting" and again.num_output == 1 and "r" in planner.state.waiting


def test_a_step_that_ran_before_a_preemption_does_not_touch_the_request_readmitted_to_the_same_worker() -> None:
    planner, _ = make()
    order = preempted_mid_step(planner)
    planner._apply(Decisions(assign={"r": "w0"}))  # admitted again before the step reports
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 21, 2)], [], 60))
    again = planner.state.requests["r"]
    assert again.phase == "prefill" and again.num_computed == 0 and again.num_output == 1
    order = planner.schedule()[0]["w0"]
    assert order.aborts == ["r"] and [(n.request_id, n.resume_token_ids) for n in order.new_requests] == [("r", [7])]
    assert order.decode == [] and [c.request_id for c in order.prefill] == ["r"]


def test_once_a_request_of_a_task_misses_the_next_ones_of_that_task_are_due_at_once() -> None:
    """A miss makes its task late; a later call of it competes as a request already past its
    TTFT (served best effort), while other tasks and requests without one keep their objectives."""
    planner, clock = make()
    spec = SLOSpec(ttft_ms=100.0, task="agent-1")
    submit(planner, "a.0", slo=spec)
    submit(planner, "b.0", slo=SLOSpec(ttft_ms=100.0, task="agent-2"))
    order = planner.schedule()[0]["w0"]
    clock.advance(0.5)  # both first tokens come 400 ms late
    planner.on_report(StepReport("w0", order.step_id, 0.5, [RequestProgress("a.0", 20, 1, "stop")], [], 64))
    assert list(planner.state.late_tasks) == ["agent-1"]
    submit(planner, "a.1", slo=spec)
    submit(planner, "c", slo=SLOSpec(ttft_ms=100.0))
    a1, c = planner.state.requests["a.1"], planner.state.requests["c"]
    assert a1.task == "agent-1" and a1.deadline == a1.arrival and a1.serve_unmeetable
    assert c.deadline == c.arrival + 0.1 and not c.serve_unmeetable
    assert planner.state.attainment["default"].met == 0  # a.0 was judged, late


def test_late_tasks_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner.state, "LATE_TASKS_KEPT", 3)
    state = planner.state.PlannerState()
    for i in range(5):
        state.task_missed(f"t{i}")
    state.task_missed("t2")
    assert list(state.late_tasks) == ["t3", "t4", "t2"]


def test_the_status_tells_the_gateway_the_room_left_in_the_best_effort_queue() -> None:
    """Prompts due in 1 ms are parked (no worker is known well enough to call them unmeetable),
    one at most; the rest are refused, and from then on the gateway refuses newcomers itself
    until the queue has room again."""
    planner = Planner(SLOPolicy(load_profile(BUILTIN_CPU_PROFILE), best_effort_limit=1), ManualClock(),
                      DEFAULT_CLASSES, worker_timeout_s=1.0)
    planner.on_hello(WorkerHello("w0", "colocated", 64, 16, 2048, 1))
    due_now = SLOSpec(ttft_ms=1.0, tpot_ms=50.0)
    for rid in ("a", "b", "c"):
        submit(planner, rid, 100, due_now)
    _, verdicts = planner.schedule()
    assert sorted(type(v).__name__ for v in verdicts) == ["Parked", "Refused", "Refused"]
    assert planner.status(0).queue_room == 0
    parked = next(v.request_id for v in verdicts if isinstance(v, Parked))
    planner.on_abort(Abort(parked, "the client left"))
    planner.schedule()
    assert planner.status(0).queue_room == 1
