"""The planner or the gateway killed with SIGKILL mid-stream: `up` starts it again. Without
the planner, streams pause and then go on with exactly their tokens (the workers say hello to
the new planner, the gateway sends it its open requests again); without the gateway, its
streams are cut with it, and the new one starts clean: the planner aborts what they had asked
for, and every KV block is free again."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from server_process import IGNORE_EOS, PROMPTS, Server, greedy_texts, start, stream_all, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]

MIN_UPTIME_S = 10.0  # the launcher's: a process that dies younger cannot run, and everything stops


def child(server: Server, command: str) -> psutil.Process:
    """The live child of `up` running `command` (a killed one lingers as a zombie until reaped)."""
    kids = []
    for p in psutil.Process(server.proc.pid).children():
        try:
            if p.cmdline()[3:4] == [command]:
                kids.append(p)
        except psutil.ZombieProcess:
            continue
    assert len(kids) == 1, kids
    return kids[0]


def old_enough(process: psutil.Process) -> None:
    time.sleep(max(0.0, process.create_time() + MIN_UPTIME_S + 0.5 - time.time()))


def restarted(server: Server, command: str, victim: psutil.Process) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if child(server, command).pid != victim.pid:
                return
        except AssertionError:
            pass
        assert time.monotonic() < deadline, f"{command} was not started again"
        time.sleep(0.2)


def test_planner_killed_mid_stream(tiny_model: Path, tmp_path: Path) -> None:
    max_tokens = 200
    server = start(tiny_model, tmp_path, workers=1,
                   extra=("--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--kv-transport", "zmq"))
    victim = child(server, "planner")
    old_enough(victim)
    under_way = threading.Barrier(len(PROMPTS) + 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            texts = pool.submit(stream_all, server, max_tokens, under_way)
            under_way.wait(60)
            victim.kill()
            got = texts.result(timeout=180)
        assert got == greedy_texts(tiny_model, PROMPTS, max_tokens)
        restarted(server, "planner", victim)
        assert wait_idle(server, timeout=30)["slos_requests_resubmitted_total"] >= 1
    finally:
        server.stop()


def test_gateway_killed_mid_stream(tiny_model: Path, tmp_path: Path) -> None:
    """The workers are frozen around the gateway's death (beating every 5 s, so the planner
    calls them alive for 20 s), so nothing finishes by itself: only the new gateway's hello
    empties the planner's queues."""
    server = start(tiny_model, tmp_path, workers=1,
                   extra=("--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--kv-transport", "zmq"),
                   env_extra={"SLOS_HEARTBEAT_S": "5.0"})
    victim = child(server, "gateway")
    workers = [p for p in psutil.Process(server.proc.pid).children() if "worker" in p.cmdline()]
    old_enough(victim)
    under_way = threading.Barrier(len(PROMPTS) + 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            texts = pool.submit(stream_all, server, 400, under_way)
            under_way.wait(60)
            for w in workers:
                w.suspend()
            victim.kill()
            with pytest.raises((openai.APIError, ConnectionError, OSError)):
                texts.result(timeout=60)
        restarted(server, "gateway", victim)
        deadline = time.monotonic() + 15
        while any(server.admin("GET", "/queues").json()["running"].values()):
            assert time.monotonic() < deadline, server.admin("GET", "/queues").json()
            time.sleep(0.2)
        for w in workers:
            w.resume()
        deadline = time.monotonic() + 60
        while True:  # the new gateway listens, and has the planner's status
            try:
                wait_idle(server, timeout=30)  # nothing runs, every KV block is free
                break
            except (AssertionError, httpx.HTTPError, KeyError):
                assert time.monotonic() < deadline
                time.sleep(0.5)
        out = server.client().completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=8,
                                                 temperature=0, extra_body=IGNORE_EOS)
        assert out.choices[0].text == greedy_texts(tiny_model, PROMPTS[:1], 8)[0]
    finally:
        for w in workers:
            w.resume()
        server.stop()
        assert not os.path.exists(f"/proc/{victim.pid}")
