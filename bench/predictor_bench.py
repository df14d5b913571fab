"""How fast the performance model prices candidate batches: the DP scheduler calls it with
many candidates at once, so what matters is the amortised cost per batch at each vector size."""

from __future__ import annotations

import time

import numpy as np

from shared.roofline import Batches, Profile


def random_batches(n: int, seed: int = 0) -> Batches:
    rng = np.random.default_rng(seed)
    decode = rng.integers(0, 256, n)
    context = rng.integers(16, 4096, n)
    prefill = rng.integers(0, 2048, n)
    verify = rng.integers(1, 11, n)
    return Batches.of(prefill, decode, verify, kv_read=decode * context, num_seqs=decode + (prefill > 0),
                      attention_pairs=decode * verify * context + prefill * prefill // 2)


def ns_per_prediction(profile: Profile, n: int, min_seconds: float = 0.5) -> float:
    """Best-of-several amortised nanoseconds per batch when `n` batches are priced per call."""
    batches = random_batches(n)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        profile.predict(batches)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best / n * 1e9
