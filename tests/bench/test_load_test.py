"""The load test's arithmetic: per-class latencies, the workers' waits, what the JSON holds."""

from __future__ import annotations

import json
import math

from bench.load_test import Report, latencies, summarize, worker_time, workload
from bench.workloads import Outcome
from shared.roofline import BUILTIN_CPU_PROFILE, load_profile


def outcome(rid: str, cls: str, ttft: float | None, tpots: list[float | None], met: bool,
            refused: bool = False) -> Outcome:
    return Outcome(rid, cls, 0.0, 10, 5 if ttft else 0, refused, not refused, met, ttft, tpots)


def test_latencies_count_refusals_as_misses_and_take_each_requests_slowest_stage() -> None:
    outcomes = [outcome(f"r{i}", "chatbot", 0.1 * (i + 1), [0.01, 0.02 * (i + 1)], met=i < 6) for i in range(9)]
    outcomes.append(outcome("no", "chatbot", None, [], met=False, refused=True))
    lat = latencies(outcomes)
    assert (lat.requests, lat.refused, lat.finished, lat.met) == (10, 1, 9, 6)
    assert lat.attainment == 0.6
    assert math.isclose(lat.ttft_ms[50], 500.0) and math.isclose(lat.tpot_ms[50], 100.0)
    assert math.isclose(lat.ttft_ms[99], 892.0)


def test_a_class_with_nothing_finished_has_no_percentiles() -> None:
    lat = latencies([outcome("no", "coding", None, [], met=False, refused=True)])
    assert lat.attainment == 0.0 and all(math.isnan(v) for v in lat.ttft_ms.values())


def test_worker_time_is_what_grew_during_the_run() -> None:
    before = [{"worker_id": "w0", "busy_s": 1.0, "waited_s": 0.01}]
    after = [{"worker_id": "w0", "busy_s": 3.0, "waited_s": 0.05}, {"worker_id": "w1", "busy_s": 2.0, "waited_s": 0.02}]
    spent = worker_time(before, after)
    assert spent is not None and math.isclose(spent.busy_s, 4.0) and math.isclose(spent.waited_s, 0.06)
    assert math.isclose(spent.idle_share, 0.015)
    assert worker_time([], []) is None  # not our server: nothing to read


def test_the_report_says_goodput_and_attainment_per_run() -> None:
    run = summarize(2.0, 10.0, 12.5, [outcome("a", "chatbot", 0.2, [0.05], True), outcome("b", "coding", 0.3, [0.2], False)])
    assert set(run.by_class) == {"chatbot", "coding"} and run.goodput == 0.1
    raw = json.loads(json.dumps(Report("http://x/v1", "m", "mixed", "p.json", 0, [run]).to_json(), default=str))
    assert raw["runs"][0]["goodput"] == 0.1 and raw["runs"][0]["attainment"] == 0.5
    assert raw["runs"][0]["idle_share"] is None and len(raw["runs"][0]["outcomes"]) == 2


def test_the_workload_is_clipped_to_the_context_and_to_the_count() -> None:
    arrivals = workload("summarization", load_profile(BUILTIN_CPU_PROFILE), 4.0, 10.0, 0, False, 512, 5)
    assert len(arrivals) == 5
    assert all(a.prompt_tokens <= 256 and a.prompt_tokens + a.output_tokens < 512 for a in arrivals)
