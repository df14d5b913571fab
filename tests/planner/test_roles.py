"""Mode choice: colocated mode, falling back when a pool is lost, going home when it is back
(once the worker's own requests allow), and moving a worker to the pool that is the bottleneck."""

from __future__ import annotations

from planner.core import Planner
from planner.decisions import Decisions
from planner.policies.fcfs import FCFSPolicy
from planner.roles import COOLDOWN_S, choose_roles
from planner.state import PlannerState, RequestState, WorkerState
from planner.waiting import WaitingQueue
from shared.clock import ManualClock
from shared.messages import (
    ExportedRequest,
    KVEndpoint,
    RequestProgress,
    SamplingParams,
    SLOSpec,
    StepReport,
    Submit,
    WorkerHello,
)
from shared.roofline import ModelShape, Profile, RooflineParams
from shared.slo import DEFAULT_CLASSES, SLOTarget

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))


def cluster(*roles: str) -> PlannerState:
    s = PlannerState()
    for i, role in enumerate(roles):
        s.workers[f"{role[0]}{i}"] = WorkerState(f"{role[0]}{i}", role, 1000, 16, 8192, 0.0)  # type: ignore[arg-type]
    return s


def test_colocated_mode_makes_every_worker_colocated() -> None:
    s = cluster("prefill", "decode")
    s.mode = "colocated"
    assert choose_roles(s, 0.0, GPU, rebalance=True) == {"p0": "colocated", "d1": "colocated"}


def test_a_lost_pool_turns_the_other_colocated_and_it_goes_home_when_the_pool_is_back() -> None:
    s = cluster("prefill", "prefill", "decode")
    s.workers["d2"].alive = False
    assert choose_roles(s, 0.0, GPU, rebalance=False) == {"p0": "colocated", "p1": "colocated"}
    for w in ("p0", "p1"):
        s.workers[w].role = "colocated"
    assert choose_roles(s, 0.0, GPU, rebalance=False) == {}  # still no decode worker
    s.workers["d2"].alive = True
    assert choose_roles(s, 0.0, GPU, rebalance=False) == {"p0": "prefill", "p1": "prefill"}
    s = cluster("decode", "decode")
    assert choose_roles(s, 0.0, GPU, rebalance=False) == {"d0": "colocated", "d1": "colocated"}


def test_a_backlogged_prefill_pool_takes_an_idle_decode_worker_once_per_cooldown() -> None:
    s = cluster("prefill", "decode", "decode")
    for i in range(50):
        rid = f"r{i}"
        s.requests[rid] = RequestState(rid, [1] * 4000, SamplingParams(max_tokens=64), SLOTarget(), 0.0)
        s.waiting.add(s.requests[rid])
    assert choose_roles(s, 10.0, GPU, rebalance=True) == {"d1": "prefill"}
    assert choose_roles(s, 10.0, GPU, rebalance=False) == {}
    s.last_role_change = 10.0
    assert choose_roles(s, 10.0 + COOLDOWN_S / 2, GPU, rebalance=True) == {}
    s = cluster("prefill", "decode")  # never the last worker of a pool
    s.requests, s.waiting = {}, WaitingQueue()
    assert choose_roles(s, 10.0, GPU, rebalance=True) == {}


def test_the_planner_holds_a_move_until_the_worker_has_no_work_its_new_role_cannot_finish() -> None:
    clock = ManualClock()
    planner = Planner(FCFSPolicy(), clock, DEFAULT_CLASSES, worker_timeout_s=10.0)
    planner.on_hello(WorkerHello("w0", "colocated", 64, 16, 2048, 1))
    planner.on_submit(Submit("r", [1] * 20, SamplingParams(max_tokens=8, temperature=0.0), SLOSpec(), 0.0))
    order = planner.schedule()[0]["w0"]
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    w0 = planner.state.workers["w0"]
    planner._apply(Decisions(roles={"w0": "prefill"}))
    assert w0.role == "colocated" and w0.target_role == "prefill"  # r decodes here first
    order = planner.schedule()[0]["w0"]
    assert order.decode == ["r"] and order.role is None
    planner.on_report(StepReport("w0", order.step_id, 0.01, [RequestProgress("r", 27, 8, "length")], [], 64))
    order = planner.schedule()[0]["w0"]
    assert w0.role == "prefill" and w0.target_role is None and order.role == "prefill"


def test_a_handover_decided_with_its_source_turning_decode_keeps_the_request_there(caplog) -> None:
    """The policy decides on the state before the move: the move keeps the prefilled request on
    its worker (no KV to move), and the handover of it is moot, not a policy error."""
    planner = Planner(FCFSPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=10.0)
    planner.on_hello(WorkerHello("p0", "prefill", 64, 16, 2048, 1))
    planner.on_hello(WorkerHello("d1", "decode", 64, 16, 2048, 2))
    planner.on_submit(Submit("r", [1] * 20, SamplingParams(max_tokens=8, temperature=0.0), SLOSpec(), 0.0))
    order = planner.schedule()[0]["p0"]
    export = ExportedRequest("r", [1] * 21, 20, 20, SamplingParams(max_tokens=8), [0, 1], KVEndpoint("zmq", "p0", [64]))
    planner.on_report(StepReport("p0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60, [export]))
    req = planner.state.requests["r"]
    assert req.phase == "handover"
    planner._apply(Decisions(roles={"p0": "decode"}, handover={"r": "d1"}))
    assert (req.phase, req.worker_id, req.handover) == ("decode", "p0", None)
    assert "r" not in planner.state.workers["d1"].requests and planner.handovers == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_move_waits_for_the_step_in_flight_which_ran_under_the_old_role() -> None:
    """A prefill worker falls back to colocated and is sent home while the step that prefills
    as colocated is in flight: read as a prefill worker's, its report would leave the finished
    prompts neither exported nor decoding, for ever."""
    planner = Planner(FCFSPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=10.0)
    planner.state.mode = "disaggregated"
    planner.on_hello(WorkerHello("p0", "prefill", 64, 16, 2048, 1))
    planner.on_submit(Submit("r", [1] * 20, SamplingParams(max_tokens=8, temperature=0.0), SLOSpec(), 0.0))
    planner._apply(Decisions(roles={"p0": "colocated"}))
    order = planner.schedule()[0]["p0"]
    assert order.role == "colocated" and [n.request_id for n in order.new_requests] == ["r"]
    planner.on_hello(WorkerHello("d1", "decode", 64, 16, 2048, 2))
    p0 = planner.state.workers["p0"]
    planner._apply(Decisions(roles={"p0": "prefill"}))
    assert (p0.role, p0.target_role) == ("colocated", "prefill")
    planner.on_report(StepReport("p0", order.step_id, 0.01, [RequestProgress("r", 20, 1)], [], 60))
    assert planner.state.requests["r"].phase == "decode"  # it decodes where it was prefilled
    order = planner.schedule()[0]["p0"]
    assert order.decode == ["r"] and p0.role == "colocated"
