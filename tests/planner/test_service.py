"""The planner's state transitions, driven by messages and a manual clock."""

from __future__ import annotations

from planner.policies.fcfs import FCFSPolicy
from planner.service import Planner
from shared.clock import ManualClock
from shared.messages import (
    Abort,
    Admitted,
    Heartbeat,
    Refused,
    RequestProgress,
    SamplingParams,
    SLOSpec,
    SpecCounts,
    StepReport,
    Submit,
    TokenChunk,
    WorkerHello,
)
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


def test_unknown_slo_class_and_duplicates_are_refused() -> None:
    planner, _ = make()
    [refused] = submit(planner, "r", slo=SLOSpec(slo_class="nope"))
    assert isinstance(refused, Refused) and "nope" in refused.reason
    submit(planner, "s")
    [dup] = submit(planner, "s")
    assert isinstance(dup, Refused)


def test_abort_of_a_delivered_request_reaches_the_worker() -> None:
    planner, _ = make()
    submit(planner, "r")
    order = planner.schedule()[0]["w0"]
    planner.on_abort(Abort("r"))
    assert planner.state.workers["w0"].reserved_blocks == 0
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    follow_up = planner.schedule()[0]["w0"]
    assert follow_up.aborts == ["r"] and not follow_up.decode


def test_abort_of_a_waiting_request_needs_no_worker() -> None:
    planner, _ = make()
    planner.state.workers["w0"].step_in_flight = 99
    submit(planner, "r")
    planner.on_abort(Abort("r"))
    assert planner.state.waiting == [] and planner.pending_aborts == {}


def test_silent_worker_is_declared_dead_and_its_requests_fail() -> None:
    planner, clock = make()
    submit(planner, "r")
    planner.schedule()
    clock.advance(0.5)
    planner.on_heartbeat(Heartbeat("w0", 60))
    clock.advance(0.9)
    assert planner.check_workers() == []
    clock.advance(0.2)
    assert planner.check_workers() == [TokenChunk("r", [], "", finish_reason="error")]
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
    assert planner.status(0).speculation == {"coding": SpecCounts(3, 2)}

    plain = Planner(FCFSPolicy(spec_len=3), clock, DEFAULT_CLASSES, worker_timeout_s=1.0)
    plain.on_hello(WorkerHello("w0", "colocated", 64, 16, 2048, 1))  # cannot speculate: never asked to
    submit(plain, "r")
    order = plain.schedule()[0]["w0"]
    plain.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    assert plain.schedule()[0]["w0"].spec_lens == {}
