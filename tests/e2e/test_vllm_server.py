"""The server on vLLM's engine core (`--engine vllm`): a worker killed with SIGKILL mid-stream,
colocated or a decode worker of a disaggregated pool, and every stream still ends with exactly
the greedy text one engine gives alone, without gaps or repeats. Needs `pip install -e .[vllm]`."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from server_process import PROMPTS, greedy_texts, kill_mid_stream, start, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial"),
              pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])")]


@pytest.mark.parametrize("args,victim,handovers", [
    (("--workers", "2"), "worker-0", False),
    (("--mode", "disaggregated", "--prefill", "1", "--decode", "2", "--kv-transport", "nixl"), "decode-0", True),
], ids=["colocated", "disaggregated"])
def test_vllm_worker_killed_mid_stream(vllm_model: Path, tmp_path: Path, args: tuple[str, ...], victim: str,
                                       handovers: bool) -> None:
    if "nixl" in args:
        pytest.importorskip("nixl._api")
    max_tokens = 200
    server = start(vllm_model, tmp_path, workers=2, extra=("--engine", "vllm", *args))
    try:
        assert kill_mid_stream(server, victim, max_tokens, 300) == greedy_texts(vllm_model, PROMPTS, max_tokens)
        metrics = wait_idle(server, timeout=60)
        assert metrics["slos_requests_resubmitted_total"] >= 1
        assert (metrics["slos_kv_handovers_total"] >= len(PROMPTS)) == handovers
    finally:
        server.stop()
