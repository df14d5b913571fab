"""vLLM's engine core under our orders (`engine.vllm_engine`): the tokens plain vLLM gives, and
each step running exactly the tokens ordered. Needs `pip install -e .[vllm]`."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])"),
              pytest.mark.xdist_group("vllm")]


def run(script: Path, args: dict) -> dict | list:
    done = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith(("[", "{"))][-1])


def test_greedy_tokens_equal_plain_vllm_with_every_step_as_ordered(vllm_model: Path) -> None:
    """16 requests joining one per step, their prompts in 7-token chunks (never a block's
    multiple) beside the others' decodes."""
    prompts = [[(7 * i + 13 * j) % 500 + 3 for j in range(20 + 9 * i)] for i in range(16)]
    ours = run(ROOT / "tests/engine/vllm_driver.py",
               {"model": str(vllm_model), "prompts": prompts, "chunk": 7, "stagger": 1, "max_tokens": 12})
    plain = run(ROOT / "bench/vllm_greedy.py",
                {"model": str(vllm_model), "prompts": prompts, "max_tokens": 12, "dtype": "float32", "enforce_eager": True})
    assert ours["differing"] == []
    assert ours["tokens"] == plain
    assert ours["held"] == 0 and ours["free_blocks"] == ours["num_blocks"]
