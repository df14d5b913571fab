"""The performance model: how long one engine step takes, as a roofline.

A step processes T tokens (prefill chunks plus decoding sequences times the tokens each one
verifies) and reads the weights plus the KV cache of every sequence in it:

    compute = (T * flops_per_token + attention_pairs * flops_per_pair) * inv_flops
    memory  = (weight_bytes + kv_tokens_read * kv_bytes_per_token) * inv_bandwidth
    time    = overhead + per_sequence * sequences + combine(compute, memory)

with `combine` either max (the hardware overlaps the two) or sum (it does not), whichever fits
the measurements better. `inv_flops` and `inv_bandwidth` are the reciprocals of the effective
peaks; all four coefficients are fitted by least squares on relative error. Everything takes
numpy arrays, so the planner can price many candidate batches in one call.
"""

from __future__ import annotations

import functools
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

PROFILE_VERSION = 1
SHIPPED_PROFILES = Path(__file__).parent / "profiles"  # GPU profiles, see bench/gpu_profiles.py
BUILTIN_CPU_PROFILE = SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json"
Combine = Literal["max", "sum"]
ArrayLike = np.ndarray | float | int


class ModelShape(msgspec.Struct, frozen=True, dict=True):
    """What the cost of a step depends on; names follow the Llama layout. The derived sizes
    are cached: the planner prices batches with them thousands of times a second."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True
    dtype_bytes: int = 2

    @functools.cached_property
    def params_per_layer(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attn + mlp

    @functools.cached_property
    def params(self) -> int:
        """Parameters every token multiplies through: the layers and the output head."""
        return self.layers * self.params_per_layer + self.vocab * self.hidden

    @functools.cached_property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @functools.cached_property
    def flops_per_token(self) -> int:
        return 2 * self.params

    @functools.cached_property
    def flops_per_pair(self) -> int:
        """Attention FLOPs for one (query token, cached token) pair: QK^T and PV."""
        return 4 * self.layers * self.heads * self.head_dim

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


class RooflineParams(msgspec.Struct, frozen=True):
    overhead_s: float
    per_sequence_s: float
    inv_flops: float  # seconds per FLOP: 1 / effective peak
    inv_bandwidth: float  # seconds per byte: 1 / effective bandwidth
    combine: Combine = "max"

    @property
    def effective_tflops(self) -> float:
        return 1e-12 / self.inv_flops if self.inv_flops > 0 else float("inf")

    @property
    def effective_gbps(self) -> float:
        return 1e-9 / self.inv_bandwidth if self.inv_bandwidth > 0 else float("inf")


@dataclass(frozen=True)
class Batches:
    """A set of candidate batches, one per array element (fields broadcast against each other)."""

    prefill_tokens: np.ndarray
    decode_seqs: np.ndarray
    verify_len: np.ndarray  # tokens each decoding sequence runs: 1 + speculative length
    kv_read: np.ndarray  # cached tokens read by attention, summed over sequences
    num_seqs: np.ndarray
    attention_pairs: np.ndarray  # sum over sequences of new tokens x context tokens

    @classmethod
    def of(cls, prefill_tokens: ArrayLike = 0, decode_seqs: ArrayLike = 0, verify_len: ArrayLike = 1,
           kv_read: ArrayLike = 0, num_seqs: ArrayLike | None = None,
           attention_pairs: ArrayLike = 0) -> Batches:
        return cls(*(np.asarray(a, dtype=np.float64) for a in (
            prefill_tokens, decode_seqs, verify_len, kv_read,
            decode_seqs if num_seqs is None else num_seqs, attention_pairs)))

    @property
    def tokens(self) -> np.ndarray:
        return self.prefill_tokens + self.decode_seqs * self.verify_len


def terms(shape: ModelShape, b: Batches) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and bytes of each batch."""
    flops = b.tokens * shape.flops_per_token + b.attention_pairs * shape.flops_per_pair
    nbytes = shape.weight_bytes + b.kv_read * shape.kv_bytes_per_token
    return flops, nbytes


def split(shape: ModelShape, p: RooflineParams, b: Batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds per batch in three parts: the fixed cost (per step and per sequence), compute
    and memory traffic. With `combine` "max", the part that does not bind is 0, so that the
    parts always add up to the prediction."""
    flops, nbytes = terms(shape, b)
    compute, memory = flops * p.inv_flops, nbytes * p.inv_bandwidth
    if p.combine == "max":
        binds = compute >= memory
        compute, memory = np.where(binds, compute, 0.0), np.where(binds, 0.0, memory)
    return p.overhead_s + p.per_sequence_s * b.num_seqs, compute, memory


def predict(shape: ModelShape, p: RooflineParams, b: Batches) -> np.ndarray:
    """Seconds per batch (`split`'s parts added up, without splitting: this is the planner's
    hot path)."""
    flops, nbytes = terms(shape, b)
    compute, memory = flops * p.inv_flops, nbytes * p.inv_bandwidth
    bound = np.maximum(compute, memory) if p.combine == "max" else compute + memory
    return p.overhead_s + p.per_sequence_s * b.num_seqs + bound


def prefill_budget(shape: ModelShape, p: RooflineParams, step_s: float, decode_seqs: float,
                   verify_len: float, kv_read: float) -> int:
    """The most prefill tokens that fit beside the given decode work in a step of `step_s`,
    ignoring the prefill's own attention (small for chunks of a few hundred tokens)."""
    return int(prefill_budgets(shape, p, step_s, decode_seqs, verify_len, kv_read))


def prefill_cost(shape: ModelShape, tokens: ArrayLike, done: ArrayLike = 0) -> np.ndarray:
    """Prefill of `tokens` after `done` already in the cache, in the tokens a prefill budget
    counts: each token's own FLOPs plus its attention to those before it. However it is
    chunked, the prompt's attention is the same triangle, so a long prompt planned against the
    budgets alone would fall behind its plan by that share."""
    tokens = np.asarray(tokens, dtype=np.float64)
    return tokens + tokens * (np.asarray(done, dtype=np.float64) + tokens / 2) * (shape.flops_per_pair
                                                                                 / shape.flops_per_token)


def prefill_within(shape: ModelShape, cost: float, done: int) -> int:
    """The most prompt tokens after `done` in the cache whose `prefill_cost` is at most `cost`:
    a batch's budget filled with the chunk it prices, however deep into its prompt."""
    if cost <= 0:
        return 0
    r = shape.flops_per_pair / shape.flops_per_token
    linear = 1.0 + r * done  # cost = linear * t + r * t**2 / 2, solved for t
    return int(2.0 * cost / (linear + math.sqrt(linear * linear + 2.0 * r * cost)) + 1e-9)


def prefill_budgets(shape: ModelShape, p: RooflineParams, step_s: ArrayLike, decode_seqs: ArrayLike,
                    verify_len: ArrayLike, kv_read: ArrayLike, attention_pairs: ArrayLike | None = None,
                    chunk_kv: float = 0.0) -> np.ndarray:
    """`prefill_budget` for arrays of steps (broadcast against each other). `attention_pairs`:
    the decode tokens' attention, by default `kv_read` (one token a sequence). A prefill chunk
    reads the KV of its own tokens and of the `chunk_kv` prompt tokens before it, as `predict`
    counts them: beside a decode batch that nearly fills the step with memory traffic, that and
    not compute is what limits the chunk."""
    step_s, decode_seqs, verify_len, kv_read = (np.asarray(a, dtype=np.float64)
                                                 for a in (step_s, decode_seqs, verify_len, kv_read))
    pairs = kv_read if attention_pairs is None else np.asarray(attention_pairs, dtype=np.float64)
    fixed = p.overhead_s + p.per_sequence_s * (decode_seqs + 1)
    decode_s = (decode_seqs * verify_len * shape.flops_per_token + pairs * shape.flops_per_pair) * p.inv_flops
    per_kv = shape.kv_bytes_per_token * p.inv_bandwidth  # seconds a KV token read takes
    memory = (shape.weight_bytes + kv_read * shape.kv_bytes_per_token) * p.inv_bandwidth + chunk_kv * per_kv
    per_token = shape.flops_per_token * p.inv_flops  # a prefill token's compute
    room = step_s - fixed
    if p.combine == "max":  # compute and memory traffic overlap: each must fit on its own
        blocked = (room <= 0) | (memory > room)
        compute = (room - decode_s) / per_token if per_token > 0 else np.inf
        traffic = (room - memory) / per_kv if per_kv > 0 else np.inf
        tokens = np.minimum(compute, traffic)
    else:
        room = room - memory - decode_s
        blocked = room <= 0
        tokens = room / (per_token + per_kv) if per_token + per_kv > 0 else np.full(np.shape(room), np.inf)
    tokens = np.minimum(np.floor(tokens), 1 << 30)
    return (np.maximum(tokens, 0) * ~blocked).astype(np.int64)


def _solve(design: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Least squares on relative error with non-negative coefficients (drop and refit)."""
    active = list(range(design.shape[1]))
    w = 1.0 / np.maximum(times, 1e-12)
    while True:
        coef, *_ = np.linalg.lstsq(design[:, active] * w[:, None], times * w, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            out = np.zeros(design.shape[1])
            out[active] = np.maximum(coef, 0)
            return out
        active.pop(int(np.argmin(coef)))


def fit(shape: ModelShape, b: Batches, times: np.ndarray, overhead: bool = True) -> RooflineParams:
    """The better of the sum and the max combinations, by relative error. Without `overhead`
    the fixed cost is taken to be zero: data in which the bytes read never vary cannot tell a
    fixed cost from the time to read the weights."""
    flops, nbytes = (np.broadcast_to(t, times.shape) for t in terms(shape, b))
    one = np.ones_like(times) if overhead else np.zeros_like(times)
    seqs = np.broadcast_to(b.num_seqs, times.shape)
    c = _solve(np.stack([one, seqs, flops, nbytes], axis=1), times)
    candidates = [RooflineParams(c[0], c[1], c[2], c[3], "sum")]
    inv_f, inv_b = max(c[2], 1e-18), max(c[3], 1e-18)
    for _ in range(30):  # alternate: pick each batch's bound, refit both slopes
        on_compute = flops * inv_f >= nbytes * inv_b
        c = _solve(np.stack([one, seqs, flops * on_compute, nbytes * ~on_compute], axis=1), times)
        if c[2] <= 0 or c[3] <= 0:
            break
        done = np.allclose([c[2], c[3]], [inv_f, inv_b])
        inv_f, inv_b = c[2], c[3]
        if done:
            break
    candidates.append(RooflineParams(c[0], c[1], inv_f, inv_b, "max"))
    best = min(candidates, key=lambda p: mape(predict(shape, p, b), times))
    return msgspec.structs.replace(best, **{f: float(getattr(best, f)) for f in (
        "overhead_s", "per_sequence_s", "inv_flops", "inv_bandwidth")})


def r2(predicted: np.ndarray, measured: np.ndarray) -> float:
    residual = np.sum((measured - predicted) ** 2)
    total = np.sum((measured - measured.mean()) ** 2)
    return float(1 - residual / total) if total > 0 else 1.0


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    return float(np.mean(np.abs(predicted - measured) / measured))


class FitQuality(msgspec.Struct, frozen=True):
    r2: float
    mape: float
    train_samples: int
    test_samples: int


class Profile(msgspec.Struct, frozen=True):
    """A fitted performance model for one model shape on one machine, stored as JSON."""

    model: ModelShape
    hardware: str
    params: RooflineParams
    quality: FitQuality | None = None
    source: str = ""
    version: int = PROFILE_VERSION

    def predict(self, b: Batches) -> np.ndarray:
        return predict(self.model, self.params, b)

    def rescaled(self, fixed: float, compute: float, memory: float, turnaround_s: float = 0.0) -> Profile:
        """The same machine with its fixed costs, compute and memory traffic that many times
        slower, and `turnaround_s` more for every step (the serving loop around the engine,
        shared cores, another thread count: see planner.calibration)."""
        if fixed == compute == memory == 1.0 and turnaround_s == 0.0:
            return self
        p = self.params
        return msgspec.structs.replace(self, params=msgspec.structs.replace(
            p, overhead_s=p.overhead_s * fixed + turnaround_s, per_sequence_s=p.per_sequence_s * fixed,
            inv_flops=p.inv_flops * compute, inv_bandwidth=p.inv_bandwidth * memory))


class ProfileError(ValueError):
    pass


def save_profile(profile: Profile, path: Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(profile)) + b"\n")


def load_profile(path: Path, expect: ModelShape | None = None) -> Profile:
    """Load and validate; `expect` rejects a profile measured on another model shape."""
    try:
        profile = msgspec.json.decode(Path(path).read_bytes(), type=Profile)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProfileError(f"{path} is not a valid profile: {exc}") from None
    if profile.version != PROFILE_VERSION:
        raise ProfileError(f"{path} has profile version {profile.version}, expected {PROFILE_VERSION}")
    if expect is not None and msgspec.structs.replace(profile.model, name=expect.name) != expect:
        raise ProfileError(f"{path} profiles model shape {profile.model}, not {expect}")
    return profile


def cpu_name() -> str:
    """The CPU's model name, as the profiles' `hardware` gives it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def shipped_cpu_profile(model_dir: Path | None, threads: int = 2) -> Path:
    """The shipped CPU profile of the model in `model_dir` at `threads` threads, found by its
    shape, where one was measured; the built-in model's two-thread profile otherwise
    (`slos-serve profile` makes one for any model)."""
    config = Path(model_dir or "") / "config.json"
    if model_dir is None or not config.is_file():
        return BUILTIN_CPU_PROFILE
    return matching_cpu_profile(model_dir, threads) or BUILTIN_CPU_PROFILE


def matching_cpu_profile(model_dir: Path, threads: int) -> Path | None:
    """A shipped CPU profile of the model's shape measured at `threads` threads, if any."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    shape = (raw.get("num_hidden_layers"), raw.get("hidden_size"), raw.get("num_attention_heads"),
             raw.get("num_key_value_heads", raw.get("num_attention_heads")), raw.get("intermediate_size"),
             raw.get("vocab_size"))
    for path in sorted(SHIPPED_PROFILES.glob(f"cpu-{threads}_*.json")):
        m = load_profile(path).model
        if (m.layers, m.hidden, m.heads, m.kv_heads, m.intermediate, m.vocab) == shape:
            return path
    return None
