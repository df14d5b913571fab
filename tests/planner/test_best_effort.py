"""Best-effort requests under the SLO policy: placed into the slack promises leave, and the
first to make way when promised work needs their blocks (`planner.policies.best_effort`)."""

from __future__ import annotations

from policy_states import GPU, LOOSE, TIGHT, request, state, step_time, worker

from planner.policies.slos import SLOPolicy
from shared.slo import SLOTarget


def test_a_parked_request_past_its_ttft_is_served_as_best_effort_in_slack() -> None:
    late = request("late", 100, TIGHT, arrival=0.0)
    late.parked = True
    s = state([worker("w0")], [late], {})
    d = SLOPolicy(GPU).schedule(s, now=5.0)
    assert d.assign == {"late": "w0"} and d.best_effort == {"late"}
    assert d.batches["w0"].prefill == [("late", 100)]


def test_best_effort_needs_slack_and_is_preempted_for_promised_work() -> None:
    be = [request(f"be{i}", 1000, SLOTarget()) for i in range(3)]
    s = state([worker("w0", blocks=300)], [request("new", 2000, LOOSE)], {"w0": be})
    for r in be:
        r.best_effort = True
    d = SLOPolicy(GPU).schedule(s, now=0.0)
    assert d.assign == {"new": "w0"}
    preempted = [rid for rid, _ in d.preempt]
    assert len(preempted) == 1 and set(preempted) <= {"be0", "be1", "be2"}
    assert not set(preempted) & set(d.batches["w0"].decode)

    full = state([worker("w0", blocks=200)], [request("extra", 100, SLOTarget())], {"w0": [request("d", 2900, TIGHT)]})
    assert SLOPolicy(GPU).schedule(full, now=0.0).assign == {}  # no slack in memory: it waits


def test_best_effort_decoders_leave_the_tpot_promised_in_the_same_call() -> None:
    """Seen live: a tight request was promised, and in the same call eight requests past their
    TTFT were placed beside it as best effort, by the room the worker's running requests left;
    eleven decoders then ran 21 ms steps against its 18.5 ms TPOT. The room counts the TPOTs
    promised in this call too."""
    tight = SLOTarget(ttft_ms=2000.0, tpot_ms=12.0)  # a handful of sequences decode within it here
    late = [request(f"be{i}", 100, SLOTarget(ttft_ms=10.0, tpot_ms=200.0)) for i in range(30)]
    for r in late:
        r.parked = True
    s = state([worker("w0")], [request("t", 100, tight, arrival=0.9), *late], {"w0": [request("d", 500, LOOSE)]})
    d = SLOPolicy(GPU).schedule(s, now=1.0)
    assert d.assign["t"] == "w0" and "t" not in d.best_effort
    assert d.best_effort and step_time(s, [], ["d", "t", *d.best_effort], {}) <= 0.012  # once they all decode
