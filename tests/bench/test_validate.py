"""The parts of the live-against-simulated validation that run without a server."""

from __future__ import annotations

from bench.validate import as_loaded, with_loop_overhead, within_context
from bench.workloads import Arrival, scenario
from shared.roofline import SHIPPED_PROFILES, Batches, load_profile


def test_requests_are_clipped_to_the_context_window_follow_ups_too() -> None:
    follow = Arrival("t.1", 0.5, 3000, 500, "tool_calling")
    arrivals = [Arrival("a", 0.0, 100, 50, "chatbot"), Arrival("b", 1.0, 5000, 3000, "chatbot"),
                Arrival("t.0", 2.0, 900, 40, "tool_calling", then=follow)]
    clipped = within_context(arrivals, 2048)
    assert [(a.prompt_tokens, a.output_tokens) for a in clipped] == [(100, 50), (1024, 1023), (900, 40)]
    assert clipped[2].then is not None and (clipped[2].then.prompt_tokens, clipped[2].then.output_tokens) == (1024, 500)
    assert [a.at for a in clipped] == [0.0, 1.0, 2.0] and clipped[1].slo_class == "chatbot"


def test_the_loop_overhead_is_added_to_every_step_and_to_the_objectives() -> None:
    profile = load_profile(SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json")
    slower = with_loop_overhead(profile, 0.01)
    batches = Batches.of(prefill_tokens=[0, 512], decode_seqs=[8, 0], kv_read=[800, 0])
    assert (slower.predict(batches) - profile.predict(batches)).round(9).tolist() == [0.01, 0.01]
    fast, slow = (scenario("reasoning", p, 2.0, 5.0) for p in (profile, slower))
    assert all(s.ttft_ms > f.ttft_ms and s.stages[0].tpot_ms > f.stages[0].tpot_ms for f, s in zip(fast, slow))


def test_the_profile_as_loaded_follows_the_live_probes_between_their_rates() -> None:
    profile = load_profile(SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json")
    fits = {1.0: (1.5, 1.2), 3.0: (2.5, 1.6)}
    batch = Batches.of(decode_seqs=8, kv_read=800)

    def factors(rate: float) -> tuple[float, float]:
        p = as_loaded(profile, fits, rate).params
        return (round(p.per_sequence_s / profile.params.per_sequence_s, 6),
                round(p.inv_bandwidth / profile.params.inv_bandwidth, 6))

    assert factors(1.0) == (1.5, 1.2) and factors(2.0) == (2.0, 1.4) and factors(3.0) == (2.5, 1.6)
    assert factors(0.5) == factors(1.0) and factors(9.0) == factors(3.0)
    assert as_loaded(profile, fits, 3.0).predict(batch) > as_loaded(profile, fits, 1.0).predict(batch)
