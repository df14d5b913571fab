"""Unknown output lengths: class estimates that follow what finishes, and reservations that
grow when a request outlives its estimate."""

from __future__ import annotations

from planner.core import Planner
from planner.lengths import LengthModel, expected_output
from planner.policies.sarathi import SarathiPolicy
from planner.state import RESERVE_AHEAD
from shared.clock import ManualClock
from shared.messages import RequestProgress, SamplingParams, SLOSpec, StepReport, Submit, WorkerHello
from shared.slo import DEFAULT_CLASSES


def test_estimates_follow_finished_requests_of_the_class() -> None:
    m = LengthModel(typical={"chatbot": 300})
    assert m.estimate("chatbot") == 300 and m.estimate("coding") == 256 and m.estimate(None) == 256
    for _ in range(200):
        m.observe("chatbot", 40)
    assert m.estimate("chatbot") == 40 and m.estimate("coding") == 256
    assert expected_output(40, 10, 1000) == 40 and expected_output(40, 100, 1000) == 200
    assert expected_output(40, 100, 150) == 150


def test_a_request_that_outlives_its_estimate_grows_its_reservation() -> None:
    planner = Planner(SarathiPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=10.0)
    planner.on_hello(WorkerHello("w0", "colocated", 1000, 16, 8192, 1))
    planner.state.lengths.means["chatbot"] = 64.0
    planner.on_submit(Submit("r", [1] * 64, SamplingParams(max_tokens=4000), SLOSpec("chatbot"), 0.0))
    order = planner.schedule()[0]["w0"]
    req, w0 = planner.state.requests["r"], planner.state.workers["w0"]
    # what it holds on average over its life: the prompt and half the 64 tokens it is expected to write
    assert req.reserved_blocks == w0.reserved_blocks == (64 + 32 + 15) // 16  # not 4,064 tokens' worth
    step = order.step_id
    for written in range(1, 120):
        planner.on_report(StepReport("w0", step, 0.01, [RequestProgress("r", 64 + written - 1, written)], [], 900))
        step = planner.schedule()[0]["w0"].step_id
        assert req.reserved_blocks * 16 >= 64 + written + RESERVE_AHEAD  # room for the next steps, always
    assert req.reserved_blocks > 7 and w0.reserved_blocks == req.reserved_blocks
    planner.on_report(StepReport("w0", step, 0.01, [RequestProgress("r", 64 + 119, 120, "stop")], [], 1000))
    assert w0.reserved_blocks == 0 and planner.state.lengths.estimate("chatbot") == 120
