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
MAX_TOKENS = 16
# Varied lengths, never repeating within a prompt; then prompts that repeat themselves, which
# gives an n-gram lookup something to find.
PLAIN = [[(7 * i + 13 * j) % 500 + 3 for j in range(20 + 9 * i)] for i in range(16)]
REPEATING = [[3 + (i + j % (5 + i)) % 500 for j in range(40 + 7 * i)] for i in range(8)]

pytestmark = [pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])"),
              pytest.mark.xdist_group("vllm")]


def run(script: Path, args: dict) -> dict | list:
    done = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "Error" in line]  # the root cause, above the traceback
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n" + done.stderr[-2000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith(("[", "{"))][-1])


@pytest.fixture(scope="module")
def plain_vllm(vllm_model: Path) -> list[list[int]]:
    """Greedy tokens of plain vLLM (`LLM.generate`) for PLAIN + REPEATING."""
    return run(ROOT / "bench/vllm_greedy.py", {"model": str(vllm_model), "prompts": PLAIN + REPEATING,
                                               "max_tokens": MAX_TOKENS, "dtype": "float32", "enforce_eager": True})


def test_greedy_tokens_equal_plain_vllm_with_every_step_as_ordered(vllm_model: Path,
                                                                    plain_vllm: list[list[int]]) -> None:
    """16 requests joining one per step, their prompts in 7-token chunks (never a block's
    multiple) beside the others' decodes."""
    ours = run(ROOT / "tests/engine/vllm_driver.py", {"model": str(vllm_model), "prompts": PLAIN, "chunk": 7,
                                                      "stagger": 1, "max_tokens": MAX_TOKENS})
    assert ours["differing"] == []
    assert ours["tokens"] == plain_vllm[:len(PLAIN)]
    assert ours["held"] == 0 and ours["free_blocks"] == ours["num_blocks"]


def test_ngram_speculation_keeps_greedy_tokens(vllm_model: Path, plain_vllm: list[list[int]]) -> None:
    """Every decode speculates 3 of vLLM's n-gram proposals, truncated from the 10 it makes."""
    ours = run(ROOT / "tests/engine/vllm_driver.py", {"model": str(vllm_model), "prompts": REPEATING, "chunk": 16,
                                                      "stagger": 1, "max_tokens": MAX_TOKENS, "spec_len": 3})
    assert ours["differing"] == []
    assert ours["proposed"] > 0
    assert ours["tokens"] == plain_vllm[len(PLAIN):]
    assert ours["held"] == 0 and ours["free_blocks"] == ours["num_blocks"]


@pytest.mark.parametrize("transport", ["nixl", "zmq"])
def test_handover_between_two_vllm_engines_keeps_greedy_tokens(vllm_model: Path, plain_vllm: list[list[int]],
                                                                transport: str) -> None:
    """A prefill engine and a decode engine, as a 1 + 1 disaggregated pair: each request's
    prompt in 7-token chunks on the first, its KV read into the second's cache, decoded there
    beside the others, while later requests still prefill."""
    if transport == "nixl":
        pytest.importorskip("nixl._api")
    ours = run(ROOT / "tests/engine/vllm_driver.py", {"model": str(vllm_model), "prompts": PLAIN, "chunk": 7,
                                                      "stagger": 1, "max_tokens": MAX_TOKENS, "handover": transport})
    assert ours["differing"] == []
    assert ours["tokens"] == plain_vllm[:len(PLAIN)]
    assert ours["held"] == 0 and ours["free_blocks"] == ours["num_blocks"]
