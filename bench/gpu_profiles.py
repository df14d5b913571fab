"""GPU profiles for paper-scale simulation, derived from hardware peaks and model shapes.

The roofline of a GPU is its peak FLOP rate and memory bandwidth, each derated by an
efficiency. The efficiencies are calibrated on the measured
per-operator times of Llama-2-7B's non-attention layers (Vidur's profiles in
`../shared/data/profiles/`): fitted on every other token count, checked on the rest. The same
efficiencies then price every model shape on that GPU. Attention uses the same derated peaks;
no measurement here checks it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.roofline import Batches, FitQuality, ModelShape, Profile, RooflineParams, fit, mape, predict, r2

NON_ATTENTION_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
                     "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense fp16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    vidur_csv: str


GPUS = [
    GPU("a100-80gb", 312e12, 2.039e12, "a100_llama2_7b_mlp.csv"),
    GPU("h100-sxm", 989e12, 3.35e12, "h100_llama2_7b_mlp.csv"),
]

MODELS = [
    ModelShape("opt-6.7b", 32, 4096, 32, 32, 128, 16384, 50272, gated_mlp=False),
    ModelShape("opt-13b", 40, 5120, 40, 40, 128, 20480, 50272, gated_mlp=False),
    ModelShape("opt-30b", 48, 7168, 56, 56, 128, 28672, 50272, gated_mlp=False),
    ModelShape("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000),
    ModelShape("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000),
    ModelShape("llama-30b", 60, 6656, 52, 52, 128, 17920, 32000),
]
LLAMA2_7B = MODELS[3]


@dataclass
class Calibration:
    gpu: GPU
    layer_params: RooflineParams  # one layer of Llama-2-7B without attention
    tokens: np.ndarray
    measured_s: np.ndarray  # whole model, non-attention part
    predicted_s: np.ndarray
    peak_only_s: np.ndarray  # the same at 100 % of the peaks, no overhead
    held_out: np.ndarray  # mask of the token counts not used to fit
    quality: FitQuality


def read_vidur(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token counts and the median non-attention time of one layer (seconds), tensor
    parallelism 1."""
    rows = [r for r in csv.DictReader(path.open()) if r["num_tensor_parallel_workers"] == "1"]
    rows.sort(key=lambda r: int(r["num_tokens"]))
    tokens = np.array([int(r["num_tokens"]) for r in rows], dtype=np.float64)
    ms = np.array([sum(float(r[f"time_stats.{op}.median"]) for op in NON_ATTENTION_OPS) for r in rows])
    return tokens, ms / 1e3


def calibrate(gpu: GPU, data_dir: Path) -> Calibration:
    tokens, layer_s = read_vidur(Path(data_dir) / gpu.vidur_csv)
    layer = ModelShape("llama-2-7b-layer", 1, 4096, 32, 32, 128, 11008, vocab=0)
    held_out = np.arange(len(tokens)) % 2 == 1
    batches = Batches.of(prefill_tokens=tokens, num_seqs=0)
    train = Batches.of(prefill_tokens=tokens[~held_out], num_seqs=0)
    params = fit(layer, train, layer_s[~held_out], overhead=False)
    predicted = predict(layer, params, batches) * LLAMA2_7B.layers
    peak = RooflineParams(0.0, 0.0, 1 / gpu.peak_flops, 1 / gpu.bandwidth, "max")
    peak_only = predict(layer, peak, batches) * LLAMA2_7B.layers
    measured = layer_s * LLAMA2_7B.layers
    quality = FitQuality(r2(predicted[held_out], measured[held_out]),
                         mape(predicted[held_out], measured[held_out]),
                         int((~held_out).sum()), int(held_out.sum()))
    return Calibration(gpu, params, tokens, measured, predicted, peak_only, held_out, quality)


def gpu_profile(model: ModelShape, cal: Calibration) -> Profile:
    p = cal.layer_params
    params = RooflineParams(overhead_s=0.0, per_sequence_s=0.0,
                            inv_flops=p.inv_flops, inv_bandwidth=p.inv_bandwidth, combine=p.combine)
    return Profile(model=model, hardware=cal.gpu.name, params=params, quality=cal.quality,
                   source=(f"derived from {cal.gpu.name} peaks ({cal.gpu.peak_flops / 1e12:.0f} TFLOP/s, "
                           f"{cal.gpu.bandwidth / 1e12:.2f} TB/s) and the model shape; efficiencies "
                           f"calibrated on Vidur's Llama-2-7B operator times ({cal.gpu.vidur_csv}); "
                           "quality = non-attention part on held-out token counts"))


def profile_name(gpu: GPU, model: ModelShape) -> str:
    return f"{gpu.name}_{model.name}.json"
