"""The SLO policy on hand-built states (`policy_states`), priced on an A100-like profile:
routing, soft admission, preemption, per-request speculative lengths, batches that keep the
tightest TPOT, and a disaggregated cluster whose decode pool caps admission. Best effort and
batch sizing have files of their own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_states import GPU, LOOSE, SHAPE, TIGHT, request, state, step_time, worker

from planner.admission import Plan, plan
from planner.calibration import MIN_STEPS
from planner.decisions import WorkerBatch
from planner.jobs import Job
from planner.policies.placement import load_of
from planner.policies.sarathi import SarathiPolicy
from planner.policies.slos import LATE_CHUNK, SLOPolicy
from planner.policies.speculation import acceptance
from planner.prices import IDLE_STEP_S, Replica, idle_step_s
from planner.state import PlannerState, RequestState, WorkerState
from shared.messages import SpecCounts
from shared.roofline import SHIPPED_PROFILES, Batches, load_profile, prefill_within, split
from shared.slo import SLOTarget


def test_admits_what_fits_keeps_the_tightest_tpot_and_parks_the_rest() -> None:
    decoding = [request(f"d{i}", 500, TIGHT) for i in range(8)]
    waiting = [request(f"w{i}", 3000, LOOSE, arrival=0.0) for i in range(60)]
    s = state([worker("w0")], waiting, {"w0": decoding})
    d = SLOPolicy(GPU).schedule(s, now=0.0)
    assert 0 < len(d.assign) < 60 and set(d.assign.values()) == {"w0"}
    assert len(d.park) == 60 - len(d.assign) and not d.refuse
    batch = d.batches["w0"]
    assert batch.decode == [r.request_id for r in decoding]
    assert batch.prefill and step_time(s, batch.prefill, batch.decode, batch.spec_lens) <= 0.030


def test_a_slow_machine_admits_a_short_prompt_that_a_full_idle_chunk_would_make_late() -> None:
    """On one CPU core a 512-token chunk of SmolLM2 takes 3.5 s as a new worker's margin prices
    it, more than the 2.8 s TTFT; an idle worker's batch of just the 88-token prompt waiting
    keeps it, so the request is promised, not parked."""
    cpu = load_profile(SHIPPED_PROFILES / "cpu-1_smollm2-135m-instruct.json")
    cold = WorkerState("w0", "colocated", 364, 16, 8192, last_seen=0.0)
    assert idle_step_s(cold.fit.priced(cpu), 0, 0) > 2.8
    waiting = [request("a", 88, SLOTarget(ttft_ms=2790.0, tpot_ms=750.0), max_tokens=448)]
    d = SLOPolicy(cpu).schedule(state([cold], waiting), now=0.0)
    assert d.assign == {"a": "w0"} and not d.park and not d.best_effort
    assert d.batches["w0"].prefill == [("a", 88)]


def test_a_short_prompt_beside_loose_decoders_is_promised_though_a_whole_period_would_miss_it() -> None:
    """Two requests decode at 750 ms a token on one CPU core, a step of theirs in flight: a
    period as long as their TPOT allows, after a step as long, would end past an 8-token
    prompt's 0.8 s TTFT; but the step in flight takes about 110 ms and one batch of the prompt
    beside them about 150 ms, so the prompt is promised, not parked."""
    cpu = load_profile(SHIPPED_PROFILES / "cpu-1_smollm2-135m-instruct.json")
    loose = SLOTarget(ttft_ms=3000.0, tpot_ms=750.0)
    decoding = [request("d0", 88, loose, max_tokens=448), request("d1", 150, loose, max_tokens=149)]
    s = state([worker("w0")], [request("a", 8, SLOTarget(ttft_ms=800.0, tpot_ms=745.0))], {"w0": decoding})
    w = s.workers["w0"]
    w.step_in_flight, w.order_sent_at = 1, 0.0
    step = Batches.of(decode_seqs=2, kv_read=240, attention_pairs=240)
    w.order_parts = tuple(float(x) for x in split(cpu.model, cpu.params, step))
    d = SLOPolicy(cpu).schedule(s, now=0.01)
    assert d.assign == {"a": "w0"} and not d.park and not d.best_effort


def test_a_prompt_is_not_promised_before_the_long_step_in_flight_ends() -> None:
    """The first planned batch starts when the step in flight ends, as that step is priced: a
    2,000-token prefill takes about 8 s on one CPU core, so an 8-token prompt due in 3 s is
    parked while it runs, and promised on the same worker idle."""
    cpu = load_profile(SHIPPED_PROFILES / "cpu-1_smollm2-135m-instruct.json")
    due = SLOTarget(ttft_ms=3000.0, tpot_ms=745.0)
    idle = SLOPolicy(cpu).schedule(state([worker("w0")], [request("a", 8, due)]), now=0.01)
    assert idle.assign == {"a": "w0"}
    s = state([worker("w0")], [request("a", 8, due)])
    w = s.workers["w0"]
    w.step_in_flight, w.order_sent_at = 1, 0.0
    step = Batches.of(prefill_tokens=2000, num_seqs=1, attention_pairs=2000**2 / 2)
    w.order_parts = tuple(float(x) for x in split(cpu.model, cpu.params, step))
    busy = SLOPolicy(cpu).schedule(s, now=0.01)
    assert busy.assign == {} and [rid for rid, _ in busy.park] == ["a"]


def test_the_best_effort_queue_is_bounded() -> None:
    decoding = [request(f"d{i}", 500, TIGHT) for i in range(8)]
    waiting = [request(f"w{i}", 3000, TIGHT) for i in range(40)]
    s = state([worker("w0")], waiting, {"w0": decoding})
    d = SLOPolicy(GPU, best_effort_limit=5).schedule(s, now=0.0)
    assert len(d.park) == 5 and len(d.refuse) == 40 - 5 - len(d.assign)
    assert all("best-effort queue is full" in why for _, why in d.refuse)
    assert d.queue_room == 0  # the gateway refuses newcomers itself while the queue is full


def test_a_full_queue_refuses_requests_with_objectives_and_never_plain_ones() -> None:
    """A plain request has nothing to be late for: it waits, as a throughput scheduler's queue
    would hold it, however full the best-effort queue (issue 21)."""
    decoding = [request(f"d{i}", 500, TIGHT) for i in range(8)]
    plain = [request(f"p{i}", 3000, SLOTarget(), arrival=0.001 * i) for i in range(20)]
    waiting = [request(f"w{i}", 3000, TIGHT) for i in range(40)] + plain
    s = state([worker("w0")], waiting, {"w0": decoding})
    d = SLOPolicy(GPU, best_effort_limit=5).schedule(s, now=0.0)
    refused = {rid for rid, _ in d.refuse}
    assert refused and all(rid.startswith("w") for rid in refused)
    assert {f"p{i}" for i in range(20)} <= {rid for rid, _ in d.park} | set(d.assign)
    assert len(refused) == 40 - 5 - len([r for r in d.assign if r.startswith("w")])


def test_the_gateway_is_told_the_room_left_in_the_queue() -> None:
    decoding = [request(f"d{i}", 500, TIGHT) for i in range(8)]
    s = state([worker("w0")], [request(f"w{i}", 3000, TIGHT) for i in range(20)], {"w0": decoding})
    d = SLOPolicy(GPU, best_effort_limit=50).schedule(s, now=0.0)
    assert d.park and d.queue_room == 50 - len(d.park)
    assert SLOPolicy(GPU, best_effort_limit=0).schedule(s, now=0.0).queue_room == -1  # no queue: each is planned
    assert SLOPolicy(GPU, best_effort_limit=5).schedule(state([worker("w0")], []), now=0.0).queue_room == 5


def test_a_tpot_no_worker_could_keep_is_refused_at_once() -> None:
    """A decode step of this model alone takes about 11 ms: a 5 ms TPOT waits for nothing
    (before, it was parked until its request timed out); 30 ms is admitted. A worker that has
    not run enough steps to be known refuses nothing: the request waits."""
    waiting = [request("fast", 100, SLOTarget(tpot_ms=5.0)), request("ok", 100, TIGHT)]
    cold = SLOPolicy(GPU).schedule(state([worker("w0")], waiting, {}), now=0.0)
    assert cold.refuse == [] and [rid for rid, _ in cold.park] == ["fast"]
    known = worker("w0")
    known.fit.seen = MIN_STEPS
    d = SLOPolicy(GPU).schedule(state([known], waiting, {}), now=0.0)
    [(rid, why)] = d.refuse
    assert rid == "fast" and "below the fastest" in why and d.assign == {"ok": "w0"}


def test_a_ttft_no_worker_could_keep_alone_is_refused_at_once_or_served_best_effort_if_asked() -> None:
    """A 4,000-token prompt takes about 290 ms to prefill alone here: a 50 ms TTFT is refused
    at once with the reason (before, it was parked and served late), unless the request asked
    to be served anyway, when it is parked for best effort; a 100-token one is admitted. One
    back from a preemption, 20 tokens written, is late, not unmeetable: it is not refused."""
    waiting = [request("long", 4000, SLOTarget(ttft_ms=50.0)), request("anyway", 4000, SLOTarget(ttft_ms=50.0)),
               request("short", 100, SLOTarget(ttft_ms=50.0)),
               request("back", 4000, SLOTarget(ttft_ms=50.0), arrival=-30.0)]
    waiting[1].serve_unmeetable = True
    waiting[3].num_output = 20
    known = worker("w0")
    known.fit.seen = MIN_STEPS
    d = SLOPolicy(GPU).schedule(state([known], waiting, {}), now=0.0)
    [(rid, why)] = d.refuse
    assert rid == "long" and "4000-token prompt takes to prefill" in why
    parked = dict(d.park)
    assert "best effort, as it asked" in parked["anyway"]
    assert d.assign["short"] == "w0" and set(d.assign) | set(parked) == {"short", "anyway", "back"}


def test_routes_to_the_replica_with_the_most_slack() -> None:
    busy = [request(f"b{i}", 4000, LOOSE) for i in range(3)]
    s = state([worker("w0"), worker("w1")], [request("new", 100)], {})
    for r in busy:  # w0 has prompts still to prefill
        r.worker_id, r.phase, r.reserved_blocks = "w0", "prefill", 10
        s.workers["w0"].requests.append(r.request_id)
        s.requests[r.request_id] = r
    assert SLOPolicy(GPU).schedule(s, now=0.0).assign == {"new": "w1"}


def test_the_routing_ablations_bind_each_request_to_one_replica() -> None:
    """Routed, every request goes where it fits; in turn, every other one waits for the replica
    too small to take it; least loaded, each goes to the replica with the most room."""
    s = state([worker("w0"), worker("w1", blocks=10)], [request(f"r{i}", 400) for i in range(6)], {})
    routed = SLOPolicy(GPU).schedule(s, now=0.0)
    in_turn = SLOPolicy(GPU, routing="round-robin").schedule(s, now=0.0)
    least_loaded = SLOPolicy(GPU, routing="least-loaded").schedule(s, now=0.0)
    assert routed.assign == least_loaded.assign == {f"r{i}": "w0" for i in range(6)}
    assert in_turn.assign == {"r0": "w0", "r2": "w0", "r4": "w0"} and {r for r, _ in in_turn.park} == {"r1", "r3", "r5"}


def test_a_worker_whose_steps_are_slower_than_any_promise_still_runs_what_it_holds() -> None:
    """With a profile far too fast for the machine (a shipped profile on a slower host), once
    calibration sees the real steps no plan fits what the worker holds; it must still serve
    it, late, earliest deadline first, not sit idle while the streams hang."""
    w = worker("w0")
    w.fit.fixed = w.fit.compute = w.fit.memory = 20.0
    held = [request(f"r{i}", 600, TIGHT, arrival=0.1 * (2 - i)) for i in range(3)]
    s = state([w])
    for r in held:
        r.worker_id, r.phase = "w0", "prefill"
        r.reserved_blocks = w.blocks_for(r.tokens_on(w.role))
        w.reserved_blocks += r.reserved_blocks
        w.requests.append(r.request_id)
        s.requests[r.request_id] = r
    d = SLOPolicy(GPU).schedule(s, now=0.0)
    (first, n), *_ = d.batches["w0"].prefill
    assert first == "r2" and n >= 400


def test_a_worker_short_of_blocks_preempts_the_request_furthest_ahead_of_its_tpot() -> None:
    """vLLM preempts the newest request; the SLO policy the one the pause costs least."""
    ahead, behind, newest = (request(rid, 1000, TIGHT, arrival=t) for rid, t in (("ahead", 0.0), ("behind", 1.0),
                                                                                    ("newest", 2.0)))
    s = state([worker("w0", blocks=200)], [], {"w0": [ahead, behind, newest]})
    s.workers["w0"].reserved_blocks = 250  # they have outgrown the cache by 50 blocks: one of them must go
    for r, gap in ((ahead, 0.010), (behind, 0.040), (newest, 0.030)):
        r.tracker.add(1, 3.0)
        r.tracker.add(1, 3.0 + gap)  # against a TPOT of 30 ms: 20 ms ahead, 10 ms behind, on time
    assert [rid for rid, _ in SLOPolicy(GPU).schedule(s, now=3.1).preempt] == ["ahead"]
    assert [rid for rid, _ in SarathiPolicy().schedule(s, now=3.1).preempt] == ["newest"]


def test_speculates_the_fewest_tokens_that_keep_each_requests_tpot() -> None:
    tight = [request(f"t{i}", 500, SLOTarget(ttft_ms=1000.0, tpot_ms=12.0), slo_class="coding") for i in range(4)]
    loose = [request(f"l{i}", 500, LOOSE, slo_class="chatbot") for i in range(4)]
    s = state([worker("w0", speculator="ngram")], [request("short", 100)], {"w0": tight + loose})  # a step with prefill
    s.speculation = {c: SpecCounts(1000, 800, 250, rejected=70) for c in ("coding", "chatbot")}
    batch = SLOPolicy(GPU).schedule(s, now=0.0).batches["w0"]
    ks = {rid: batch.spec_lens.get(rid, 0) for rid in batch.decode}
    assert all(ks[r.request_id] > 0 for r in tight)  # plain decoding is too slow for 12 ms here
    assert all(ks[r.request_id] == 0 for r in loose)
    plain = SLOPolicy(GPU, max_spec_len=0).schedule(s, now=0.0).batches["w0"]
    assert plain.spec_lens == {}


def test_acceptance_is_estimated_per_token_whatever_lengths_were_asked() -> None:
    """Steps of 1 and of 10 proposals at a per-token acceptance of 0.6, counted as the planner
    counts reports: the estimate is 0.6. (The share of proposals accepted is 0.19 here, which
    read back at the mean length, rounded to 6, gave 0.54.)"""
    rng = np.random.default_rng(0)
    ks = rng.choice([1, 10], 20_000)
    accepted = np.minimum(rng.geometric(0.4, len(ks)) - 1, ks)
    s = PlannerState()
    s.speculation = {"c": SpecCounts(int(ks.sum()), int(accepted.sum()), len(ks), int((accepted < ks).sum()))}
    assert acceptance(s, "c", 0.5) == pytest.approx(0.6, abs=0.01)
    assert acceptance(s, "other", 0.5) == 0.5  # no reports yet: the prior


def test_a_waiting_requests_tier_is_priced_at_its_own_classs_acceptance() -> None:
    """Chatbot requests decode at 100 ms with proposals mostly accepted; a coding request asks
    for 10 ms, which only speculation keeps. It is promised where coding's proposals pass as
    often as chatbot's, and parked where they rarely pass."""
    def decided(coding_accepted: int) -> tuple[dict[str, str], list[str]]:
        running = [request(f"d{i}", 1000, SLOTarget(ttft_ms=1000.0, tpot_ms=100.0), slo_class="chatbot")
                   for i in range(16)]
        waiting = [request("c", 200, SLOTarget(ttft_ms=1000.0, tpot_ms=10.0), slo_class="coding")]
        s = state([worker("w0", speculator="ngram")], waiting, {"w0": running})
        s.speculation = {"chatbot": SpecCounts(1000, 900, 250, rejected=100),
                         "coding": SpecCounts(1000, coding_accepted, 250, rejected=1000 - coding_accepted)}
        d = SLOPolicy(GPU).schedule(s, now=0.0)
        return d.assign, [rid for rid, _ in d.park]

    assert decided(900) == ({"c": "w0"}, [])
    assert decided(100) == ({}, ["c"])


def test_a_request_behind_its_tpot_speculates_more_to_catch_up() -> None:
    """Acceptance is a draw: a request whose steps accepted little so far is behind its TPOT
    and asks for more tokens a step than one on schedule (which, at a period cut to one batch of
    the short prompt waiting, needs none)."""
    tight = [request(f"t{i}", 500, SLOTarget(ttft_ms=1000.0, tpot_ms=12.0), slo_class="coding") for i in range(4)]
    s = state([worker("w0", speculator="ngram")], [request("short", 100)], {"w0": tight})
    s.speculation = {"coding": SpecCounts(1000, 600, 250, rejected=150)}
    for r in tight:  # the first token came at 0.1 s
        r.tracker.add(1, 0.1)
    tight[0].tracker.add(4, 0.1 + 4 * 0.012)  # on schedule
    tight[1].tracker.add(4, 0.1 + 4 * 0.020)  # 32 ms behind
    batch = SLOPolicy(GPU).schedule(s, now=0.2).batches["w0"]
    assert batch.spec_lens["t1"] > batch.spec_lens.get("t0", 0)
    assert batch.spec_lens.get("t0") == batch.spec_lens.get("t2")  # on schedule (to rounding) is as if just started


def test_catching_up_gives_way_to_the_prefill_a_promised_prompt_needs() -> None:
    """Eight of sixteen tight decoders run behind their TPOT, and a 2,000-token prompt is due
    in 360 ms, which takes nearly every prefill token of the batches until then. Speculating
    more to catch up would cost the batch some of that prefill, and the prompt, once late,
    would run last; so the batch prefills what the plan needs and the decoders speculate as
    the period needs, no more."""
    tight = [request(f"t{i}", 1500, SLOTarget(ttft_ms=1000.0, tpot_ms=25.0), slo_class="coding") for i in range(16)]
    prompt = request("p", 2000, SLOTarget(ttft_ms=360.0, tpot_ms=200.0), slo_class="chatbot")
    s = state([worker("w0", speculator="ngram")], [prompt], {"w0": tight})
    s.speculation = {"coding": SpecCounts(1000, 600, 250, rejected=150)}
    for r in tight:
        r.tracker.add(1, 0.0)
        r.tracker.add(1, 0.025)
    for r in tight[:8]:
        r.tracker.add(1, 0.2)  # 150 ms behind
    policy, w = SLOPolicy(GPU), s.workers["w0"]
    p = policy._plan(s, w, load_of(s), s.waiting.rows(), np.ones(1, dtype=bool), 0.2, set())
    assert p.admitted == ["p"] and 0 < p.needed
    d = policy.schedule(s, now=0.2)
    batch = d.batches["w0"]
    assert d.assign == {"p": "w0"} and sum(n for _, n in batch.prefill) >= p.needed
    assert batch.spec_lens["t0"] == batch.spec_lens["t8"]  # behind or not: as the period needs
    assert step_time(s, batch.prefill, batch.decode, batch.spec_lens) <= p.step_s


def test_speculates_for_speed_when_nothing_prefills_or_memory_turns_requests_away() -> None:
    """Requests without a TPOT need no speculation to keep it, and a step with prefill gives
    its period's slack to the prefill; a step without prefill, or one beside a request that
    does not fit in memory, decodes faster instead (that is what frees room), within the period."""
    def scheduled(waiting: list[RequestState]) -> tuple[PlannerState, WorkerBatch]:
        running = [request(f"l{i}", 500, SLOTarget(), slo_class="chatbot") for i in range(8)]
        s = state([worker("w0", blocks=8 * 40 + 100, speculator="ngram")], waiting, {"w0": running})
        s.speculation = {"chatbot": SpecCounts(1000, 800, 250, rejected=70)}  # the running hold 40 blocks each
        return s, SLOPolicy(GPU).schedule(s, now=0.0).batches["w0"]

    _, roomy = scheduled([request("short", 200, LOOSE)])
    assert roomy.prefill == [("short", 200)] and roomy.spec_lens == {}
    for waiting in ([], [request("short", 200, LOOSE), request("long", 3000, LOOSE)]):
        s, batch = scheduled(waiting)
        assert [rid for rid, _ in batch.prefill] == [r.request_id for r in waiting[:1]] and len(batch.decode) == 8
        assert set(batch.spec_lens) == set(batch.decode) and min(batch.spec_lens.values()) > 0
        assert step_time(s, batch.prefill, batch.decode, batch.spec_lens) <= IDLE_STEP_S
        plain = SLOPolicy(GPU, max_spec_len=0).schedule(s, now=0.0).batches["w0"]
        assert plain.spec_lens == {}


def test_a_long_prompt_is_promised_only_if_its_attention_to_itself_fits_too() -> None:
    """Four idle batches' budgets hold a prompt of that many tokens, but not its attention to
    itself: promising it would make it late."""
    budget = plan(GPU, Replica(0, 0, None, 10_000), [Job("x", 1, 1, 1.0, None)], 0.0).budget
    due = SLOTarget(ttft_ms=(4 * IDLE_STEP_S + 1e-3) * 1e3)  # four batches

    def assigned(prompt: int) -> dict[str, str]:
        return SLOPolicy(GPU).schedule(state([worker("w0")], [request("long", prompt, due)]), now=0.0).assign

    assert assigned(4 * budget) == {}
    assert assigned(int(3.6 * budget)) == {"long": "w0"}


def test_a_prefill_worker_admits_no_more_than_the_decode_pool_can_take() -> None:
    s = state([worker("p0", "prefill"), worker("d0", "decode")], [request(f"r{i}", 200, TIGHT) for i in range(300)])
    d = SLOPolicy(GPU, max_num_seqs=256).schedule(s, now=0.0)
    slots = SLOPolicy(GPU, max_num_seqs=256)._decode_slots(s)
    assert 0 < len(d.assign) <= slots < 300
    assert set(d.assign.values()) == {"p0"} and "d0" not in d.batches


def test_handover_goes_to_a_decode_worker_whose_batch_keeps_the_tpot() -> None:
    full = [request(f"f{i}", 2000, TIGHT) for i in range(30)]
    s = state([worker("p0", "prefill"), worker("d0", "decode"), worker("d1", "decode")], [], {"d0": full})
    ready = request("ready", 500, TIGHT)
    ready.worker_id, ready.phase, ready.num_computed, ready.num_output = "p0", "handover", 500, 1
    s.workers["p0"].requests.append("ready")
    s.requests["ready"] = ready
    d = SLOPolicy(GPU).schedule(s, now=0.0)
    assert d.handover == {"ready": "d1"}
    assert d.batches["d1"].decode == ["ready"]


def test_a_prefilled_request_whose_tpot_no_decode_worker_keeps_is_still_handed_over() -> None:
    """Seen live: a promise made before the workers were known, with a TPOT below what a decode
    worker does for one sequence alone, was never accepted by a decode worker and its stream
    hung until the client gave up. It is late whatever happens: it decodes where there is room."""
    s = state([worker("p0", "prefill"), worker("d1", "decode")], [], {"d1": [request("loose", 300, LOOSE)]})
    stuck = request("stuck", 500, SLOTarget(ttft_ms=1000.0, tpot_ms=0.5))
    stuck.worker_id, stuck.phase, stuck.num_computed, stuck.num_output = "p0", "handover", 500, 1
    s.workers["p0"].requests.append("stuck")
    s.requests["stuck"] = stuck
    assert SLOPolicy(GPU).schedule(s, now=0.0).handover == {"stuck": "d1"}
    full = [request(f"f{i}", 2000, TIGHT) for i in range(30)]  # room is still what decides
    s.workers["d1"].requests.clear()
    for r in full:
        r.worker_id, r.phase, r.num_computed, r.num_output = "d1", "decode", r.prompt_len, 1
        s.requests[r.request_id] = r
        s.workers["d1"].requests.append(r.request_id)
    assert SLOPolicy(GPU).schedule(s, now=0.0).handover == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(5.0, 300.0), min_size=1, max_size=12), st.integers(100, 3000), st.floats(0.05, 0.95))
def test_when_the_tightest_tier_does_not_speculate_no_request_needs_to(tpots: list[float], prompt: int,
                                                                       alpha: float) -> None:
    """The policy skips working out speculative lengths when the plan's tightest tier takes
    k = 0; that holds only if the period then keeps every decoding request's TPOT."""
    reqs = [request(f"d{i}", prompt, SLOTarget(ttft_ms=1000.0, tpot_ms=t), slo_class="c") for i, t in enumerate(tpots)]
    s = state([worker("w0", speculator="ngram")], [], {"w0": reqs})
    s.speculation = {"c": SpecCounts(1000, round(1000 * alpha), 250, rejected=round(1000 * (1 - alpha)))}
    policy, w = SLOPolicy(GPU), s.workers["w0"]
    p = policy._plan(s, w, load_of(s), s.waiting.rows(), np.zeros(0, dtype=bool), 0.0, set())
    if p.spec_len == 0:
        assert policy._spec_lens(s, w, [r.request_id for r in reqs], p.step_s, 1) == {}


def test_the_prompt_tokens_of_the_step_in_flight_are_planned_as_done() -> None:
    """Seen in the simulator: a plan made while a step ran counted that step's chunks twice,
    as time the step takes and as prompt still to run, so a promise it was keeping looked late
    (and ran last) and new requests were parked. A prompt the step in flight ends decodes from
    the next batch on, which the plan prices as decode work."""

    def plan_with(in_flight: dict[str, int] | None) -> Plan:
        s = state([worker("w0")], [], {"w0": [request(f"d{i}", 500, TIGHT) for i in range(8)]})
        w = s.workers["w0"]
        if in_flight is not None:
            long = request("long", 3000, TIGHT)
            long.worker_id, long.phase = "w0", "prefill"
            s.requests["long"] = long
            w.requests.append("long")
            w.step_in_flight, w.in_flight_prefill = 1, in_flight
        return SLOPolicy(GPU)._plan(s, w, load_of(s), s.waiting.rows(), np.zeros(0, dtype=bool), 0.0, set())

    p = plan_with({"long": 1000})
    assert p.admitted_tokens[p.admitted.index("long")] == 2000
    ends = plan_with({"long": 3000})
    assert "long" not in ends.admitted and ends.next_budget < plan_with(None).next_budget


def test_a_late_promise_gets_a_little_prompt_where_the_decoders_leave_it_none() -> None:
    """Seen live in a burst: a promise already late, beside decoders whose TPOT left no prefill
    budget, got nothing for 2.5 s, until the decoders finished. It now gets a small chunk."""
    slo = SLOTarget(ttft_ms=1000.0, tpot_ms=12.0)
    s = state([worker("w0")], [], {"w0": [request(f"d{i}", 500, slo) for i in range(8)]})
    w = s.workers["w0"]
    late = request("late", 400, SLOTarget(ttft_ms=100.0, tpot_ms=200.0))
    late.worker_id, late.phase = "w0", "prefill"
    s.requests["late"] = late
    w.requests.append("late")
    p = SLOPolicy(GPU)._plan(s, w, load_of(s), s.waiting.rows(), np.zeros(0, dtype=bool), 0.5, set())
    assert p.next_budget == 0 and p.late == ["late"]
    batch = SLOPolicy(GPU).schedule(s, now=0.5).batches["w0"]
    assert batch.prefill == [("late", LATE_CHUNK)] and len(batch.decode) == 8


def test_a_promise_past_its_planned_end_but_not_its_ttft_runs_before_new_requests() -> None:
    """Seen live: TTFTs are planned to end `front_end_s` early, for the first token's trip; a
    promised prompt a few tokens short once that early end had passed was planned as past its
    deadline, due whenever, and each request admitted after it went first: it waited 0.7 s. It
    is now planned to its TTFT itself: it runs in the next batch, and of three new requests that
    would fill the next three batches, one waits."""
    probe = plan(GPU, Replica(decoding=0, context_tokens=0, tightest_tpot_s=None, free_blocks=4000),
                 [Job("x", 1, 1, 1.0, None)], 0.0)
    now, step = 10.0, probe.step_s
    p = request("p", 400, SLOTarget(ttft_ms=1000.0), arrival=now + 2 * step - 1.0)  # its TTFT two batches on
    p.worker_id, p.phase, p.num_computed = "w0", "prefill", 380
    tokens = prefill_within(SHAPE, probe.next_budget - 5, 0)
    new = [request(f"n{i}", tokens, SLOTarget(ttft_ms=1e3 * 5.5 * step + 1.0), arrival=now) for i in range(3)]
    s = state([worker("w0")], new)
    s.requests["p"] = p
    s.workers["w0"].requests.append("p")
    d = SLOPolicy(GPU, front_end_s=2.5 * step).schedule(s, now=now)  # p's planned end has passed
    assert d.batches["w0"].prefill[0] == ("p", 20) and sorted(d.assign) == ["n0", "n1"]
