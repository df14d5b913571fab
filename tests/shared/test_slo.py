"""Judging token times against objectives: TTFT, one TPOT, or stages with their own TPOTs."""

from __future__ import annotations

import pytest

from shared.messages import SLOSpec, Stage
from shared.slo import DEFAULT_CLASSES, SLOTarget, Tracker, UnknownSLOClass, resolve


def test_ttft_and_mean_tpot() -> None:
    t = Tracker(SLOTarget(ttft_ms=100.0, tpot_ms=10.0), arrival=1.0)
    t.add(1, 1.05)
    for i in range(1, 5):
        t.add(1, 1.05 + 0.012 * i)  # 12 ms a token: too slow
    assert t.ttft_s == pytest.approx(0.05) and t.stage_tpots_s() == [pytest.approx(0.012)]
    assert not t.met()
    fast = Tracker(SLOTarget(ttft_ms=100.0, tpot_ms=10.0), arrival=1.0)
    fast.add(1, 1.05)
    fast.add(3, 1.07)  # speculation: three tokens in one step, 20 ms after the first
    assert fast.stage_tpots_s() == [pytest.approx(0.02 / 3)] and fast.met()
    late = Tracker(SLOTarget(ttft_ms=100.0), arrival=1.0)
    late.add(1, 1.2)
    assert not late.met()


def test_stages_are_judged_each_by_its_own_tpot() -> None:
    slo = SLOTarget(ttft_ms=1000.0, tpot_ms=100.0, stages=(Stage(3, 10.0),))  # think fast, answer slowly
    t = Tracker(slo, arrival=0.0)
    times = [0.5, 0.505, 0.51, 0.6, 0.7, 0.8]  # tokens 1-2 at 5 ms, then 3-5 at 90-100 ms
    for at in times:
        t.add(1, at)
    assert t.stage_tpots_s() == [pytest.approx(0.005), pytest.approx(0.29 / 3)]
    assert t.met()
    assert slo.tpot_at(0) == slo.tpot_at(2) == 10.0 and slo.tpot_at(3) == 100.0


def test_the_lag_is_how_far_the_current_stage_runs_over_its_tpot() -> None:
    t = Tracker(SLOTarget(ttft_ms=1000.0, tpot_ms=100.0, stages=(Stage(3, 10.0),)), arrival=0.0)
    assert t.lag_s() == 0.0
    for at in (0.5, 0.515, 0.53):  # gaps of 15 ms against 10
        t.add(1, at)
    assert t.tokens == 3 and t.lag_s() == pytest.approx(-0.0)  # the thinking stage is over; the answer has none yet
    t.add(1, 0.58)
    assert t.lag_s() == pytest.approx(0.05 - 0.1)  # ahead of the answer's 100 ms
    early = Tracker(SLOTarget(ttft_ms=1000.0, tpot_ms=100.0, stages=(Stage(3, 10.0),)), arrival=0.0)
    for at in (0.5, 0.515):
        early.add(1, at)
    assert early.lag_s() == pytest.approx(0.005)
    assert Tracker(SLOTarget(ttft_ms=1000.0), arrival=0.0).lag_s() == 0.0


def test_a_resumed_request_has_no_ttft_to_judge_and_counts_from_where_it_was() -> None:
    t = Tracker(SLOTarget(ttft_ms=1.0, tpot_ms=50.0, stages=(Stage(4, 10.0),)), arrival=0.0, resumed=True, tokens=4)
    t.add(2, 5.0)
    t.add(1, 5.04)
    assert t.met() and t.stage_tpots_s()[0] is None


def test_resolve_overrides_the_class_field_by_field() -> None:
    assert resolve(SLOSpec("coding", tpot_ms=20.0), DEFAULT_CLASSES) == SLOTarget(5000.0, 20.0)
    reasoning = resolve(SLOSpec("reasoning"), DEFAULT_CLASSES)
    assert reasoning.stages and reasoning.tpot_at(0) == 50.0
    assert resolve(SLOSpec("reasoning", tpot_ms=80.0), DEFAULT_CLASSES).stages == ()  # one TPOT replaces them
    assert resolve(SLOSpec(stages=[Stage(10, 5.0), Stage(None, 50.0)]), DEFAULT_CLASSES).tpot_at(20) == 50.0
    with pytest.raises(UnknownSLOClass):
        resolve(SLOSpec("nope"), DEFAULT_CLASSES)
