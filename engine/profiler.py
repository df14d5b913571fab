"""`slos-serve profile`: time the real engine over a grid of batch shapes and fit the roofline.

A batch shape is a list of sequences, each running `new` tokens on top of `context` cached
ones: a prefill chunk (new > 1), a decode step (new = 1) or a speculative verification
(new = 1 + k). Contexts are assumed rather than computed, so long contexts cost nothing to
set up. Each shape counts its fastest run, the one least disturbed by anything else on the
machine; runs go round-robin over the shapes. A quarter of the shapes, drawn with a fixed
seed, is held out to judge the fit.
"""

from __future__ import annotations

import csv
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from engine.config import ModelConfig
from engine.engine import Engine, default_dtype
from shared.messages import BatchOrder, PrefillChunk, SamplingParams
from shared.model_info import context_window
from shared.roofline import Batches, FitQuality, ModelShape, Profile, cpu_name, fit, mape, predict, r2

if TYPE_CHECKING:
    from engine.vllm_engine import VLLMEngine

Seq = tuple[int, int]  # (context tokens, new tokens)
BLOCK_SIZE = 16
GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


@dataclass
class Sample:
    seqs: list[Seq]
    seconds: float


def model_shape(cfg: ModelConfig, name: str, dtype: torch.dtype) -> ModelShape:
    return ModelShape(name=name, layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads,
                      kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                      intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
                      dtype_bytes=torch.finfo(dtype).bits // 8)


def grid(max_len: int, quick: bool) -> list[list[Seq]]:
    """Pure prefill, chunked prefill, pure decode, mixed batches and verification shapes."""
    prefill = [16, 64, 256, 1024] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    batches = [1, 4, 16, 32] if quick else [1, 2, 4, 8, 16, 32, 48, 64]
    contexts = [64, 512, 1024] if quick else [64, 256, 768, 1536]
    shapes: list[list[Seq]] = [[(0, q)] for q in prefill]
    shapes += [[(0, q)] * 4 for q in (64, 256)]
    shapes += [[(c, q)] for q in (64, 256) for c in (256, 1024)]
    shapes += [[(c, 1)] * b for b in batches for c in contexts]
    shapes += [[(c, 1) for c in contexts] * b for b in (1, 4)]  # decodes of mixed lengths
    shapes += [[(256, 1)] * b + [(0, q)] for b in (4, 16) for q in (64, 256)]
    shapes += [[(256, k)] * b for b in (1, 4, 16) for k in ((3, 8) if quick else (2, 4, 8))]
    return [s for s in shapes if all(c + q < max_len for c, q in s)]


def features(samples: list[Sample]) -> tuple[Batches, np.ndarray]:
    cols = np.array([
        (sum(q for _, q in s.seqs), sum(c + q for c, q in s.seqs), len(s.seqs),
         sum(q * (c + (q + 1) / 2) for c, q in s.seqs))
        for s in samples
    ], dtype=np.float64)
    batches = Batches.of(prefill_tokens=cols[:, 0], kv_read=cols[:, 1], num_seqs=cols[:, 2],
                         attention_pairs=cols[:, 3])
    return batches, np.array([s.seconds for s in samples])


def write_samples(path: Path, splits: dict[str, list[Sample]]) -> None:
    """Every measured shape with the features the roofline prices it by, so that any profile
    can be judged against these measurements later."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "seqs", "prefill_tokens", "kv_read", "num_seqs", "attention_pairs", "seconds"])
        for split, samples in splits.items():
            batches, seconds = features(samples)
            for i, s in enumerate(samples):
                out.writerow([split, " ".join(f"{c}+{q}" for c, q in s.seqs), int(batches.prefill_tokens[i]),
                              int(batches.kv_read[i]), int(batches.num_seqs[i]),
                              f"{batches.attention_pairs[i]:.1f}", f"{seconds[i]:.7f}"])


def time_shape(engine: Engine | VLLMEngine, seqs: list[Seq], tag: str) -> float:
    """Seconds of one step of the given shape."""
    ids = [f"{tag}-{i}" for i in range(len(seqs))]
    for rid, (c, q) in zip(ids, seqs):
        engine.add_request(rid, [11 + (i % 500) for i in range(c + q)], GREEDY)
        if c:
            engine.assume_computed(rid, c)
    order = BatchOrder(step_id=0, prefill=[PrefillChunk(rid, q) for rid, (_, q) in zip(ids, seqs)])
    start = time.perf_counter()
    engine.step(order)
    seconds = time.perf_counter() - start
    for rid in ids:
        engine.abort(rid)
    return seconds


def hardware_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def blocks_needed(shapes: list[list[Seq]], block_size: int) -> int:
    """KV blocks the largest shape of the grid holds at once (each sequence's last token too)."""
    return max(sum(-(-(c + q + 1) // block_size) for c, q in seqs) for seqs in shapes)


def profile(model_dir: Path, *, name: str | None = None, device: str = "cpu",
            dtype: torch.dtype | None = None, engine_kind: Literal["ours", "vllm"] = "ours",
            quick: bool = False, repeats: int = 3, seed: int = 0, kv_cache_mb: int | None = None,
            progress: Callable[[int, int], None] = lambda shapes_done, shapes: None,
            ) -> tuple[Profile, list[Sample], list[Sample]]:
    """Measure, fit on three quarters of the shapes, judge on the rest. The KV cache is what
    the grid needs unless `kv_cache_mb` says otherwise (a large model's largest batch may then
    not fit). `engine_kind` vllm times vLLM's engine core under orders, as its workers run."""
    shapes = grid(context_window(model_dir, None), quick)
    cfg = ModelConfig.from_dir(model_dir)
    dtype = dtype or default_dtype(device)
    engine: Engine | VLLMEngine
    if engine_kind == "vllm":
        from engine.vllm_engine import CPU_BLOCK_MULTIPLE, VLLMEngine

        block = CPU_BLOCK_MULTIPLE if device == "cpu" else BLOCK_SIZE
        needed = (blocks_needed(shapes, block) + 1) * block * cfg.kv_bytes_per_token(dtype.itemsize)
        engine = VLLMEngine(model_dir, device=device, dtype=str(dtype).removeprefix("torch."), block_size=block,
                            kv_cache_mb=kv_cache_mb or -(-needed // 2**20), max_num_seqs=max(map(len, shapes)))
    else:
        blocks = None if kv_cache_mb else blocks_needed(shapes, BLOCK_SIZE)
        engine = Engine(model_dir, device=device, dtype=dtype, block_size=BLOCK_SIZE,
                        kv_cache_mb=kv_cache_mb or 0, num_kv_blocks=blocks)
    total = len(shapes) * (repeats + 1)
    for i, seqs in enumerate(shapes):  # warm-up
        time_shape(engine, seqs, f"w{i}")
        progress(i + 1, total)
    best = [float("inf")] * len(shapes)
    for rep in range(repeats):  # round-robin, so a busy spell does not hit one shape only
        for i, seqs in enumerate(shapes):
            best[i] = min(best[i], time_shape(engine, seqs, f"r{rep}-{i}"))
            progress((rep + 1) * len(shapes) + i + 1, total)
    samples = [Sample(seqs, t) for seqs, t in zip(shapes, best)]
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = len(order) // 4
    test = [samples[i] for i in sorted(order[:cut])]
    train = [samples[i] for i in sorted(order[cut:])]
    shape = model_shape(cfg, name or Path(model_dir).name, dtype)
    params = fit(shape, *features(train))
    test_b, test_t = features(test)
    predicted = predict(shape, params, test_b)
    quality = FitQuality(r2(predicted, test_t), mape(predicted, test_t), len(train), len(test))
    prof = Profile(model=shape, hardware=hardware_name(device), params=params, quality=quality,
                   source=f"slos-serve profile of {model_dir} ({dtype}, {device}, engine {engine_kind})")
    return prof, train, test
