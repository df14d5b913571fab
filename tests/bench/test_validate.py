"""The parts of the live-against-simulated validation that run without a server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.validate import StepsSeen, near_capacity, pin_threads, with_loop_overhead
from bench.workloads import Arrival, scenario, within_context
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


def test_the_loaded_profile_comes_from_the_probes_near_the_capacity() -> None:
    readings = {4.0: [(1.2, 1.1, 0.05)] * 9, 1.0: [(3.3, 1.7, 0.1)] * 9,  # cold and far above; far below
                2.0: [(2.0, 1.4, 0.1), (2.2, 1.6, 0.12)], 2.2: [(2.4, 1.5, 0.11)]}
    assert near_capacity(readings, 2.0) == StepsSeen(2.2, 1.5, 0.11)
    assert near_capacity(readings, 8.0) == StepsSeen(2.2, 1.5, 0.1)  # none near: all of them


def test_every_thread_of_a_pinned_process_runs_on_the_cores_given() -> None:
    """A process's affinity is only its main thread's; the front end's threads (uvicorn, ZeroMQ)
    would go on sharing the worker's core."""
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2:
            time.sleep(0.01)
        core = min(os.sched_getaffinity(0))
        pin_threads([proc.pid], {core})
        assert all(os.sched_getaffinity(int(t)) == {core} for t in os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        proc.kill()
