"""Live, on this machine: a promise holds. Tight and loose TPOTs arrive open loop at a rate
that one worker cannot serve all of on time; whatever the planner promised (the gateway's
`X-SLO-Promised`) must meet its objectives by the client's own clock, and the rest must be
refused or served best effort, never admitted and then late. The objectives are set from this
machine's own idle decoding speed, so the test means the same on a fast and a slow host.

Not yet every promise: the aim (issue 28) is none missed, but the plan still counts a prompt
that finishes early as decoding only from its deadline, and the extra decoders shrink the
prefill budget of the prompts behind it. On a 2-core VM with promises priced at the 90th
percentile of step times, 7 of 13 runs kept every promise and the others missed 1 to 6 of
19-36 (TTFTs by 2-39 %, tight TPOTs by 0.5-4 %); at the 98th (now), 5 of 5 runs passed. Up to
MISSED_SHARE of them may miss; a planner that promises everything (`fcfs`) missed 12 of 40, and
16 and 17 of 40 in two runs on 2026-12-04. At 0.15, 6 of 46 runs that day failed (before and
after that day's planner changes alike), each with 4-6 of 25 promises missed together: tight
decoders slowed by steps that ran longer than their calibration priced on the VM's shared cores;
hence 0.25. Stop 35 traced the misses step by step and found three causes (a calibration that
forgot what large prompt chunks cost while only small steps ran, and priced the next ones at
half their time; a promise past its TTFT planned as due whenever, which each new admission
pushed back; best-effort decoders placed beside a TPOT promised in the same call); with them
fixed, 9 of 12 runs of this scenario kept every promise by the client's clock (3 of 318 missed,
against at least 11 of 322 in 12 runs of the code before, alternated with them), and 8 of 8
passed at 0.15: hence 0.15 again.
The client's clock judges a TPOT with CLOCK_SLACK to spare: its last token's trip through the
gateway, on cores it shares with the server, adds its delay to the mean gap. A CI run missed 4
of 23 tight TPOTs by 0.1-1.3 % by the client's clock while the planner's own clock (checked
below, with no slack) counted 24 of 25 promises kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.live import run_live
from bench.workloads import Arrival, Outcome
from models.build import TARGET_SHAPE, make_random
from server_process import API_KEY, start
from shared.slo import DEFAULT_CLASSES

pytestmark = [pytest.mark.slow, pytest.mark.alone]

REQUESTS = 40
TIGHT_OVER_IDLE, LOOSE_OVER_IDLE = 3.0, 12.0  # the TPOTs, as multiples of the idle TPOT measured first
TTFT_OVER_IDLE = 150.0  # the TTFT, likewise
RATE_OVER_IDLE = 0.06  # requests per idle TPOT: more than one worker keeps on time
MISSED_SHARE = 0.15  # of the promised requests, by the client's clock and by the planner's
CLOCK_SLACK = 0.02  # share of a TPOT the client's clock may read over it (see the module's docstring)


@pytest.fixture(scope="module")
def builtin_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the built-in model's shape, so the shipped CPU profile prices it."""
    return make_random(tmp_path_factory.mktemp("builtin-shaped"), TARGET_SHAPE)


def test_every_promised_request_meets_its_objectives(builtin_shaped: Path, tmp_path: Path) -> None:
    server = start(builtin_shaped, tmp_path, workers=1, extra=("--kv-cache-mb", "64"))
    url, vocab = server.url + "/v1", 4096
    try:
        idle = run_live(url, API_KEY, server.model, [Arrival(f"idle{i}", 0.0, 64, 64, "coding") for i in range(2)],
                        vocab, DEFAULT_CLASSES)
        idle_s = float(np.mean([o.tpots_s[-1] for o in idle]))
        rng = np.random.default_rng(0)
        at = np.cumsum(rng.exponential(idle_s / RATE_OVER_IDLE, REQUESTS))
        arrivals = [Arrival(f"r{i}", float(at[i]), int(rng.integers(32, 768)), 48, "coding",
                            ttft_ms=TTFT_OVER_IDLE * idle_s * 1e3,
                            tpot_ms=(TIGHT_OVER_IDLE if i % 2 else LOOSE_OVER_IDLE) * idle_s * 1e3)
                    for i in range(REQUESTS)]
        outcomes = run_live(url, API_KEY, server.model, arrivals, vocab, DEFAULT_CLASSES)
        slo = server.admin("GET", "/slo").json()
    finally:
        server.stop()

    assert len(outcomes) == REQUESTS
    promised = [o for o in outcomes if o.promised]
    due = {a.request_id: a for a in arrivals}

    def late(o: Outcome) -> bool:
        a = due[o.request_id]
        return (not o.finished or o.ttft_s is None or o.ttft_s > a.ttft_ms / 1e3
                or any(t is not None and t > (1 + CLOCK_SLACK) * a.tpot_ms / 1e3 for t in o.tpots_s))

    missed = [(o.request_id, o.ttft_s, o.tpots_s) for o in promised if late(o)]
    assert len(missed) <= MISSED_SHARE * len(promised), \
        f"promised and late (idle TPOT {idle_s * 1e3:.1f} ms): {missed}; planner: {slo}"
    assert all(o.refused or o.finished for o in outcomes)
    assert all(o.refused or o.promised is not None for o in outcomes)  # every admitted one was told which
    assert len(promised) >= REQUESTS // 4, slo  # a planner that promised nothing would pass the rest
    seen = slo["promises"]["promised"]  # by the planner's clock, the idle streams too
    assert seen["total"] >= len(promised) and seen["total"] - seen["met"] <= MISSED_SHARE * seen["total"], seen
