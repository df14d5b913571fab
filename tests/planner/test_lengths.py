"""Unknown output lengths: class estimates that follow what finishes, and reservations that
grow when a request outlives its estimate."""

from __future__ import annotations

from planner.core import Planner
from planner.lengths import LengthModel, expected_output
from planner.policies.sarathi import SarathiPolicy
from planner.state import RESERVE_AHEAD
from shared.clock import ManualClock
from shared.messages import RequestProgress, SamplingParams, SLOSpec, Stage, StepReport, Submit, WorkerHello
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


def test_a_request_with_a_stage_of_n_tokens_is_expected_to_write_them_and_what_its_class_adds() -> None:
    """A reasoning request that sets a 1,500-token thinking stage writes those and then an
    answer: the class learns the answers' length, not the whole outputs' (which the stages set
    request by request)."""
    m = LengthModel(typical={"reasoning": 256})
    assert m.estimate("reasoning", staged=1500) == 1756 and m.estimate("reasoning") == 256
    for think in (600, 1500, 2900) * 40:
        m.observe("reasoning", think + 120, staged=think)
    assert m.estimate("reasoning", staged=1500) == 1620 and m.estimate("reasoning", staged=700) == 820


def test_the_planner_expects_a_staged_request_to_write_its_stages() -> None:
    planner = Planner(SarathiPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=10.0)
    spec = SLOSpec("reasoning", stages=[Stage(tokens=2000, tpot_ms=50.0), Stage(tpot_ms=200.0)])
    planner.on_submit(Submit("r", [1] * 64, SamplingParams(max_tokens=4000), spec, 0.0))
    past = DEFAULT_CLASSES["reasoning"].output_tokens - DEFAULT_CLASSES["reasoning"].target.staged_tokens()
    assert planner.state.requests["r"].expected_output == 2000 + past
