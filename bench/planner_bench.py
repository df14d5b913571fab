"""`slos-serve bench planner`: how long one scheduling call takes with many requests queued.

Each call plans one replica (64 requests decoding) against N waiting requests with random
prompt lengths, deadlines over the next 30 s and TPOTs of three tiers, on the A100 Llama-2-7B
profile. The queue changes between calls (a tenth of it is drawn afresh), as it does live.
"""

from __future__ import annotations

import time

import numpy as np

from planner.dp_scheduler import Job, Replica, plan
from shared.roofline import Profile


def queue(rng: np.random.Generator, n: int, now: float, start: int) -> list[Job]:
    return [Job(f"r{start + i}", int(rng.integers(16, 2048)), int(rng.integers(2, 40)),
                now + float(rng.uniform(0.2, 30.0)), float(rng.choice([0.05, 0.1, 0.2])))
            for i in range(n)]


def call_times(profile: Profile, queued: int, calls: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Seconds per call, and the share of the queue admitted at the last call."""
    rng = np.random.default_rng(seed)
    replica = Replica(decoding=64, context_tokens=64 * 800, tightest_tpot_s=0.1, free_blocks=queued * 12)
    jobs = queue(rng, queued, 0.0, 0)
    times = []
    admitted = 0
    for c in range(calls):
        now = c * 0.02
        fresh = queued // 10
        jobs = jobs[fresh:] + queue(rng, fresh, now, queued + c * fresh)
        start = time.perf_counter()
        result = plan(profile, replica, jobs, now)
        times.append(time.perf_counter() - start)
        admitted = len(result.admitted)
    return np.array(times), admitted / queued
