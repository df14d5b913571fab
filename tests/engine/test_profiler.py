from __future__ import annotations

import csv
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from engine.profiler import Sample, blocks_needed, grid, profile, write_samples
from models.build import TARGET_SHAPE, make_random
from shared.model_info import context_window
from shared.roofline import load_profile


@pytest.fixture(scope="module")
def builtin_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the built-in target's shape: the same timings, built in seconds."""
    return make_random(tmp_path_factory.mktemp("builtin-shaped"), TARGET_SHAPE)


@pytest.mark.xdist_group("serial")
def test_short_real_profile_predicts_held_out_shapes(builtin_shaped: Path) -> None:
    """One thread, and never beside the servers of the end-to-end tests (same xdist group),
    so that the timings are little disturbed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prof, train, test = profile(builtin_shaped, quick=True, repeats=5)
    finally:
        torch.set_num_threads(threads)
    assert prof.quality.r2 >= 0.9, prof
    assert len(test) >= 6 and len(train) >= 3 * len(test) - 3


def test_grid_covers_every_kind_of_step() -> None:
    shapes = grid(max_len=2048, quick=True)
    assert any(len(s) == 1 and s[0][0] == 0 for s in shapes)  # pure prefill
    assert any(all(q == 1 for _, q in s) and len(s) >= 16 for s in shapes)  # big decode batch
    assert any({q for _, q in s} >= {1, 64} for s in shapes)  # mixed prefill + decode
    assert any(all(1 < q <= 9 and c > 0 for c, q in s) for s in shapes)  # verification
    assert all(c + q < 512 for s in grid(max_len=512, quick=False) for c, q in s)


def test_the_kv_cache_holds_the_largest_shape_of_the_grid() -> None:
    assert blocks_needed([[(0, 15)], [(16, 1)] * 2], block_size=16) == 4  # 16 tokens: 1 block; 18: 2 each
    assert blocks_needed(grid(max_len=2048, quick=False), 16) == 64 * 97  # 64 decodes at 1,536 of context


def test_samples_csv_keeps_every_shape_and_what_it_is_priced_by(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    write_samples(path, {"fitted": [Sample([(0, 64)], 0.0125)], "held out": [Sample([(256, 1)] * 4, 0.02)]})
    rows = list(csv.DictReader(path.open()))
    assert [r["split"] for r in rows] == ["fitted", "held out"]
    assert rows[0]["seqs"] == "0+64" and float(rows[0]["attention_pairs"]) == 64 * 32.5
    assert rows[1]["seqs"] == "256+1 256+1 256+1 256+1"
    assert (rows[1]["prefill_tokens"], rows[1]["kv_read"], rows[1]["num_seqs"]) == ("4", "1028", "4")
    assert [float(r["seconds"]) for r in rows] == [0.0125, 0.02]


@pytest.mark.xdist_group("serial")
@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])")
def test_profile_of_vllms_engine_predicts_held_out_shapes(builtin_shaped: Path, tmp_path: Path) -> None:
    """`slos-serve profile --engine vllm`: every shape timed on vLLM's engine core under orders
    (contexts assumed, as on ours), fitted as well as ours."""
    out, samples = tmp_path / "vllm.json", tmp_path / "samples.csv"
    done = subprocess.run([sys.executable, "-m", "slos_serve.cli", "profile", "--engine", "vllm", "--quick",
                           "--repeats", "3", "--model", str(builtin_shaped), "--out", str(out),
                           "--samples", str(samples)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    prof = load_profile(out)
    assert "engine vllm" in prof.source
    with open(samples) as f:
        assert len(list(csv.DictReader(f))) == len(grid(context_window(builtin_shaped, None), quick=True))
    assert prof.quality.r2 >= 0.9, prof
