"""Live, on this machine: requests with a tight TPOT decode while long prompts keep arriving.
First come first served runs each prompt whole before any decoding step, so the tight
requests stall; the SLO planner chunks the prompts into batches that keep their TPOT (and
parks what does not fit). The TPOT is set from this machine's own idle decoding speed. On our
engine, and on vLLM's engine core under the planner where vLLM is installed."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from bench.live import run_live
from bench.workloads import Arrival, attainment
from models.build import TARGET_SHAPE, make_random
from server_process import API_KEY, start
from shared.slo import DEFAULT_CLASSES

pytestmark = [pytest.mark.slow, pytest.mark.alone]

TIGHT_STREAMS = 4
TPOT_OVER_IDLE = 5.0  # the tight TPOT, as a multiple of the idle TPOT measured first


@pytest.fixture(scope="module")
def builtin_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the built-in model's shape, so the shipped CPU profile prices it."""
    return make_random(tmp_path_factory.mktemp("builtin-shaped"), TARGET_SHAPE)


def tight_attainment(model: Path, tmp: Path, policy: str, engine: str) -> float:
    tmp.mkdir()
    server = start(model, tmp, workers=1, extra=("--policy", policy, "--kv-cache-mb", "64", "--engine", engine))
    url, vocab = server.url + "/v1", 4096
    try:
        idle = run_live(url, API_KEY, server.model, [Arrival(f"idle{i}", 0.0, 64, 64, "coding")
                                                     for i in range(TIGHT_STREAMS)], vocab, DEFAULT_CLASSES)
        tpot_ms = TPOT_OVER_IDLE * 1e3 * float(np.mean([o.tpots_s[-1] for o in idle]))
        tight = [Arrival(f"t{i}", 0.05 * i, 64, 150, "coding", ttft_ms=5000.0, tpot_ms=tpot_ms)
                 for i in range(TIGHT_STREAMS)]
        long = [Arrival(f"l{i}", 0.3 + 0.1 * i, 1800, 4, "summarization", ttft_ms=10_000.0, tpot_ms=1000.0)
                for i in range(40)]
        outcomes = run_live(url, API_KEY, server.model, tight + long, vocab, DEFAULT_CLASSES)
        assert len(outcomes) == len(tight) + len(long) and all(o.finished or o.refused for o in outcomes)
        return attainment([o for o in outcomes if o.request_id.startswith("t")])
    finally:
        server.stop()


@pytest.mark.parametrize("engine", ["ours", pytest.param("vllm", marks=pytest.mark.skipif(
    find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])"))])
def test_slos_keeps_tight_tpots_that_fcfs_misses(builtin_shaped: Path, tmp_path: Path, engine: str) -> None:
    fcfs = tight_attainment(builtin_shaped, tmp_path / "fcfs", "fcfs", engine)
    slos = tight_attainment(builtin_shaped, tmp_path / "slos", "slos", engine)
    assert slos >= fcfs + 0.5, (slos, fcfs)
