"""Workers killed with SIGKILL mid-stream or with prompts queued: every request still
completes with exactly the tokens it would have had, the client sees one coherent stream,
and the launcher starts the dead worker again."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server_process import PROMPTS, greedy_texts, kill_mid_stream, start, stream_all, wait_idle, worker_pid

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]


def test_decode_worker_killed_mid_stream(tiny_model: Path, tmp_path: Path) -> None:
    max_tokens = 300
    server = start(tiny_model, tmp_path, workers=1,
                   extra=("--mode", "disaggregated", "--prefill", "1", "--decode", "2", "--kv-transport", "zmq"))
    victim = worker_pid(server, "decode-0")
    try:
        assert kill_mid_stream(server, "decode-0", max_tokens, 120) == greedy_texts(tiny_model, PROMPTS, max_tokens)
        metrics = wait_idle(server, timeout=30)
        assert metrics["slos_requests_resubmitted_total"] >= 1
        deadline = time.monotonic() + 60
        while worker_pid(server, "decode-0") == victim:  # started again
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.stop()


def test_prefill_worker_killed_with_prompts_queued(tiny_model: Path, tmp_path: Path) -> None:
    """prefill-0 is frozen, so prompts queue on it, then killed. Heartbeats every second give
    the planner four seconds before it would call the frozen worker dead by itself."""
    max_tokens = 24
    server = start(tiny_model, tmp_path, workers=1,
                   extra=("--mode", "disaggregated", "--prefill", "2", "--decode", "1"),
                   env_extra={"SLOS_HEARTBEAT_S": "1.0"})
    victim = worker_pid(server, "prefill-0")
    try:
        os.kill(victim, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            texts = pool.submit(stream_all, server, max_tokens)
            deadline = time.monotonic() + 30
            while server.metrics().get('slos_worker_requests_running{worker="prefill-0"}', 0) < 1:
                assert time.monotonic() < deadline and not texts.done()
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            assert texts.result(timeout=120) == greedy_texts(tiny_model, PROMPTS, max_tokens)
        assert wait_idle(server, timeout=30)["slos_requests_resubmitted_total"] >= 1
    finally:
        server.stop()


def test_losing_the_decode_pool_falls_back_to_colocated_and_back(tiny_model: Path, tmp_path: Path) -> None:
    max_tokens = 24
    server = start(tiny_model, tmp_path, workers=1,
                   extra=("--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--kv-transport", "zmq"))

    def role_of(worker_id: str) -> str | None:
        return next((w["role"] for w in server.admin("GET", "/workers").json() if w["worker_id"] == worker_id), None)

    def wait_for(worker_id: str, role: str) -> None:
        deadline = time.monotonic() + 60
        while role_of(worker_id) != role:
            assert time.monotonic() < deadline, server.admin("GET", "/workers").json()
            time.sleep(0.2)

    victim = worker_pid(server, "decode-0")
    try:
        os.kill(victim, signal.SIGSTOP)  # silent: the planner declares it dead; nothing restarts it yet
        wait_for("prefill-0", "colocated")
        assert stream_all(server, max_tokens) == greedy_texts(tiny_model, PROMPTS, max_tokens)
        os.kill(victim, signal.SIGKILL)  # the launcher starts it again: the pool is back
        wait_for("decode-0", "decode")
        wait_for("prefill-0", "prefill")
        assert stream_all(server, max_tokens) == greedy_texts(tiny_model, PROMPTS, max_tokens)
        assert wait_idle(server, timeout=30)["slos_kv_handovers_total"] >= len(PROMPTS)
    finally:
        server.stop()
