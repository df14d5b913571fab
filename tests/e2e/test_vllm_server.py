"""The server on vLLM's engine core (`--engine vllm`): a colocated worker killed with SIGKILL
mid-stream, and every stream still ends with exactly the greedy text one engine gives alone,
without gaps or repeats. Needs `pip install -e .[vllm]`."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest

from server_process import PROMPTS, greedy_texts, start, stream_all, wait_idle, worker_pid

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial"),
              pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e .[vllm])")]


def test_vllm_worker_killed_mid_stream(vllm_model: Path, tmp_path: Path) -> None:
    max_tokens = 200
    server = start(vllm_model, tmp_path, workers=2, extra=("--engine", "vllm"))
    victim = worker_pid(server, "worker-0")
    killed = threading.Barrier(len(PROMPTS) + 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            texts = pool.submit(stream_all, server, max_tokens, killed)
            killed.wait(120)  # every stream is under way
            os.kill(victim, signal.SIGKILL)
            got = texts.result(timeout=300)
        assert got == greedy_texts(vllm_model, PROMPTS, max_tokens)
        metrics = wait_idle(server, timeout=60)
        assert metrics["slos_requests_resubmitted_total"] >= 1
    finally:
        server.stop()
