"""`slos-serve bench live` against a running server: a scenario replayed through the `openai`
client, judged from the client's side, with the workers' waits read from the admin API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from bench.compare import CONFIGS, KV_CACHE_GB, cores, serving
from bench.live import run_live
from bench.workloads import Arrival
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from server_process import ADMIN_TOKEN, API_KEY, Server, start
from shared.slo import DEFAULT_CLASSES

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tiny_model, tmp_path_factory.mktemp("server"), workers=1, extra=("--speculator", "none"))
    yield srv
    srv.stop()


def test_bench_live_replays_a_scenario_and_reports_it(server: Server, tmp_path: Path) -> None:
    env = {**os.environ, "SLOS_API_KEY": API_KEY, "SLOS_ADMIN_TOKEN": ADMIN_TOKEN}
    done = subprocess.run(
        [sys.executable, "-m", "slos_serve.cli", "bench", "live", "--endpoint", server.url, "--scenario", "mixed",
         "--rate", "3", "--duration", "4", "--max-requests", "8", "--vocab", "500",
         "--admin-url", server.admin_url.removesuffix("/admin"), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    (run,) = report["runs"]
    outcomes = run["outcomes"]
    assert len(outcomes) == 8 and all(o["finished"] and not o["refused"] for o in outcomes)
    assert {o["slo_class"] for o in outcomes} <= {"chatbot", "coding", "summarization"}
    assert all(o["ttft_s"] > 0 and o["output_tokens"] > 0 for o in outcomes)
    assert run["attainment"] == sum(o["met"] for o in outcomes) / 8
    assert run["workers"]["busy_s"] > 0 and run["workers"]["waited_s"] > 0
    assert report["idle"]["ttft_ms"] > 0 and report["idle"]["beyond_step_ms"] is not None
    assert "| 3 | all | 8 | 0 |" in done.stdout
    assert (tmp_path / "mixed-latency.png").stat().st_size > 0


def test_compare_serves_a_disaggregated_configuration_on_the_engine_core(tiny_model: Path, tmp_path: Path) -> None:
    """`bench compare`'s disaggregated layout: both workers up, pinned to the same core, holding
    the KV memory real vLLM gets between them."""
    config = CONFIGS["slos-disaggregated"]
    with serving(config, tiny_model, tmp_path, Path("unused")) as endpoint:
        workers = endpoint.workers()
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        blocks = KVCache.num_blocks_for(ModelConfig.from_dir(tiny_model), workers[0]["block_size"],
                                        KV_CACHE_GB * 1024 // 2, torch.float32)  # real vLLM's memory, shared out
        assert all(w["kv_blocks"] == blocks for w in workers)
        (done,) = run_live(endpoint.url, endpoint.api_key, endpoint.model, [Arrival("r", 0.0, 20, 6, "coding")], 500,
                           DEFAULT_CLASSES)
        assert done.finished and done.output_tokens == 6
        assert 0 < done.verdict_s <= done.ttft_s  # the answer's headers come before its first token
        engine, _ = cores()
        ours = [p for p in psutil.process_iter(["cmdline"]) if "worker" in (p.info["cmdline"] or [])
                and p.environ().get("SLOS_ADMIN_TOKEN") == endpoint.admin_token]
        assert len(ours) == 2 and all(os.sched_getaffinity(p.pid) == engine for p in ours)
