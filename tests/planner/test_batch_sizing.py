"""How much of the plan's prefill a batch runs (`planner.policies.batch_sizing`): never past its
period, no more than runs efficiently unless deadlines need it, only what they need beside a
request behind its TPOT, and no stub of a prompt left for the next batch where its end fits."""

from __future__ import annotations

from policy_states import GPU, LOOSE, TIGHT, request, state, step_time, worker

from planner.decisions import WorkerBatch
from planner.policies.batch_sizing import EFFICIENCY, size_prefill
from planner.policies.slos import SLOPolicy
from planner.prices import IDLE_STEP_S
from planner.state import PlannerState, RequestState
from shared.slo import SLOTarget

DECODE = [f"d{i}" for i in range(8)]


def prefilling() -> tuple[PlannerState, WorkerBatch]:
    """Eight requests decoding and two prompts, 2,000 and 600 tokens of them planned."""
    s = state([worker("w0")], [], {"w0": [request(rid, 500, TIGHT) for rid in DECODE]})
    for rid, n in (("a", 3000), ("b", 600)):
        r = request(rid, n, LOOSE)
        r.worker_id, r.phase = "w0", "prefill"
        s.requests[rid] = r
        s.workers["w0"].requests.append(rid)
    return s, WorkerBatch(prefill=[("a", 2000), ("b", 600)], decode=DECODE)


def test_a_batch_never_outlasts_its_period() -> None:
    s, batch = prefilling()
    for step_s in (0.02, 0.05, 0.1, 0.2):
        for behind, needed in ((False, 0), (True, 300), (False, 2600)):
            out = size_prefill(GPU, s, batch, step_s, needed, behind)
            assert out and step_time(s, out, DECODE, {}) <= step_s
            assert out == batch.prefill[:len(out) - 1] + [out[-1]] and out[-1][1] <= dict(batch.prefill)[out[-1][0]]
    assert size_prefill(GPU, s, batch, 0.001, 0) == []  # not even the decoders fit


def test_without_deadlines_that_need_more_it_stops_where_prefill_runs_efficiently() -> None:
    s, batch = prefilling()
    lazy = size_prefill(GPU, s, batch, 0.1, 0)
    eager = size_prefill(GPU, s, batch, 0.1, 2600)  # deadlines need it all: as much as the period holds
    rate = [sum(n for _, n in b) / step_time(s, b, DECODE, {}) for b in (lazy, eager)]
    assert sum(n for _, n in lazy) < sum(n for _, n in eager) and rate[0] >= EFFICIENCY * rate[1]


def test_beside_a_request_behind_its_tpot_only_what_deadlines_need_or_the_prompts_end() -> None:
    s, batch = prefilling()
    assert size_prefill(GPU, s, batch, 0.05, 300, behind=True) == [("a", 300)]
    assert size_prefill(GPU, s, batch, 0.2, 300, behind=True) == [("a", 2000)]  # its end fits: no stub


def test_a_prompt_that_would_decode_early_at_a_tighter_tpot_keeps_its_last_token() -> None:
    """The plan counts a request's decoding from its TTFT deadline on: finishing a tight one's
    prompt early would shorten every batch sooner than planned while other prompts wait. Alone,
    or once its deadline is near, it finishes."""
    tight = SLOTarget(ttft_ms=5000.0, tpot_ms=30.0)

    def first_batch(waiting: list[RequestState]) -> dict[str, int]:
        s = state([worker("w0")], waiting)
        return dict(SLOPolicy(GPU).schedule(s, now=0.0).batches["w0"].prefill)

    assert first_batch([request("t", 40, tight), request("long", 20_000, LOOSE)])["t"] == 39
    assert first_batch([request("t", 40, tight)]) == {"t": 40}
    due_soon = SLOTarget(ttft_ms=1e3 * IDLE_STEP_S, tpot_ms=30.0)  # within two batches
    assert first_batch([request("t", 40, due_soon), request("long", 20_000, LOOSE)])["t"] == 40
