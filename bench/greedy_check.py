"""`slos-serve bench greedy`: the engine's greedy tokens beside `transformers`' and real vLLM's,
for the same chat prompts on the same model directory, all in float32.

The engine runs the prompts together, prefilled in chunks beside each other's decodes (the way
the server batches them); `transformers` recomputes every token from scratch (no KV cache);
vLLM runs its offline `LLM` API in its own virtualenv (`bench setup-vllm`).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.drive import drive
from engine.engine import Engine
from shared.messages import SamplingParams

GREEDY_SCRIPT = Path(__file__).with_name("vllm_greedy.py")
QUESTIONS = ("What is the capital of France?", "How do I sort a list in Python?", "Name three primary colours.",
             "Write a haiku about the sea.", "Explain what a KV cache is in one sentence.")
CHUNK = 16


@dataclass
class GreedyRow:
    question: str
    ours: list[int]
    transformers: list[int]
    vllm: list[int] | None


def chat_prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for q in QUESTIONS]


def ours(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = Engine(model_dir, dtype=torch.float32, kv_cache_mb=256)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = drive(engine, prompts, chunk=CHUNK, stagger=0, params=params)
    return [out[f"r{i}"] for i in range(len(prompts))]


@torch.no_grad()
def reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        result.append(ids[len(prompt):])
    return result


def vllm(python: Path, model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    args = {"model": str(model_dir), "prompts": prompts, "max_tokens": max_tokens, "dtype": "float32"}
    proc = subprocess.run([str(python), str(GREEDY_SCRIPT), json.dumps(args)], capture_output=True, text=True,
                          env={"VLLM_CPU_KVCACHE_SPACE": "2", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def greedy_rows(model_dir: Path, max_tokens: int, vllm_python: Path | None) -> list[GreedyRow]:
    prompts = chat_prompts(model_dir)
    theirs = vllm(vllm_python, model_dir, prompts, max_tokens) if vllm_python else [None] * len(prompts)
    return [GreedyRow(q, a, b, c) for q, a, b, c in zip(QUESTIONS, ours(model_dir, prompts, max_tokens),
                                                       reference(model_dir, prompts, max_tokens), theirs)]
