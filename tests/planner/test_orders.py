"""The batch order a worker gets (`planner.orders`): a prompt goes with the first order that
runs it and never again, and a request the worker does not hold (a policy bug) is left out
rather than sent to a worker that knows nothing of it."""

from __future__ import annotations

from policy_states import TIGHT, request, state, worker

from planner.decisions import WorkerBatch
from planner.orders import batch_order


def test_a_prompt_is_sent_once_and_only_to_the_worker_that_holds_it() -> None:
    s = state([worker("w0"), worker("w1")], [], {"w1": [request("other", 100, TIGHT)]})
    r = request("r", 300, TIGHT)
    r.worker_id, r.phase = "w0", "prefill"
    s.requests["r"] = r
    s.workers["w0"].requests.append("r")
    first = batch_order(s, "w0", WorkerBatch(prefill=[("r", 200)], decode=["other"], spec_lens={"other": 2}), 7, "p")
    assert [n.request_id for n in first.new_requests] == ["r"] and r.first_step == 7
    assert first.decode == [] and first.spec_lens == {}
    assert [(c.request_id, c.num_tokens) for c in first.prefill] == [("r", 200)]
    second = batch_order(s, "w0", WorkerBatch(prefill=[("r", 100)]), 8, "p")
    assert second.new_requests == [] and r.first_step == 7 and second.step_id == 8
