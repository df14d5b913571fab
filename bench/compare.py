"""`slos-serve bench compare`: serving configurations started in turn on the same model, the
same cores and the same trace, each load-tested live (`bench.load_test`) and stopped.

Every configuration's engine gets the same core (the machine's last): our workers are pinned
to it (both of them, prefill and decode, in the disaggregated layout, so that it does not get
a second core the others lack), and so are real vLLM's engine threads
(`VLLM_CPU_OMP_THREADS_BIND`). The front ends (our gateway and planner, vLLM's API server) and
the load generator share the other cores. Real vLLM runs from its own virtualenv
(`slos-serve bench setup-vllm`) as `python -m vllm.entrypoints.openai.api_server`, with
chunked prefill on as its V1 engine always has it, in the same dtype as ours (float32, the
model's own; `vllm-bfloat16` is its CPU default precision, beside). Every configuration gets
the same KV cache memory, `KV_CACHE_GB` (ours shared out among its workers): a server with
more room batches more requests at once.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.load_test import Endpoint, discover
from bench.validate import live_server
from shared.bus import free_tcp_port

KV_CACHE_GB = 4  # every configuration's KV cache, whatever its layout
START_TIMEOUT_S = 600  # vLLM's first start on two cores compiles for minutes


@dataclass(frozen=True)
class Config:
    """One way of serving the model."""

    name: str
    server: str  # "ours" or "vllm"
    policy: str = "slos"
    layout: tuple[str, ...] = ("--workers", "1")
    workers: int = 1
    dtype: str = "float32"


DISAGGREGATED = ("--mode", "disaggregated", "--prefill", "1", "--decode", "1")
CONFIGS = {
    c.name: c for c in (
        Config("slos", "ours"),
        Config("fcfs", "ours", "fcfs"),
        Config("sarathi", "ours", "sarathi"),
        Config("slos-disaggregated", "ours", "slos", DISAGGREGATED, 2),
        Config("distserve", "ours", "distserve", DISAGGREGATED, 2),
        Config("slos-vllm", "ours", layout=("--workers", "1", "--engine", "vllm")),
        Config("vllm", "vllm"),
        Config("vllm-bfloat16", "vllm", dtype="bfloat16"),
    )
}


def cores() -> tuple[set[int], set[int]]:
    """(the engine's core, the others'), the others being every core on a one-core machine."""
    every = sorted(os.sched_getaffinity(0))
    return {every[-1]}, set(every[:-1]) or set(every)


@contextmanager
def vllm_server(python: Path, model: Path, log: Path, engine_cores: set[int], front_cores: set[int],
                dtype: str) -> Iterator[Endpoint]:
    """Real `vllm serve` (its module, which the CPU wheel has where it lacks the command)."""
    port, key = free_tcp_port(), secrets.token_urlsafe(16)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB),
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(engine_cores))), "VLLM_API_KEY": key}
    args = ["taskset", "-c", ",".join(map(str, sorted(front_cores | engine_cores))), str(python), "-m",
            "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", model.name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start; see {log}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        yield discover(url, key)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def serving(config: Config, model: Path, workdir: Path, vllm_python: Path) -> Iterator[Endpoint]:
    """The configuration running, until the block ends."""
    engine, front = cores()
    log = workdir / f"{config.name}.log"
    if config.server == "vllm":
        with vllm_server(vllm_python, model, log, engine, front, config.dtype) as endpoint:
            yield endpoint
        return
    layout = (*config.layout, "--dtype", config.dtype, "--kv-cache-mb", str(KV_CACHE_GB * 1024 // config.workers))
    with live_server(model, None, log, engine, config.policy, layout, config.workers) as server:
        yield discover(server.url, server.api_key, server.model, server.admin_url, server.token)
