"""Which performance profile `up` plans with, and making one on first start where there is none.

A profile is only as good as its match to the engine it prices: the same engine, model shape,
dtype and, on a CPU, the same number of threads (a worker given one core computes about twice
as slowly as the two-thread profile says, while it reads memory about as fast). So `up` looks
for the profile of the served model on this machine at the workers' thread count, dtype and
engine in the user cache, then among the shipped ones (our engine's, of the same shape and
thread count, measured on a 2-core machine like these: files `cpu-THREADS_*.json`), and,
finding none, profiles the engine on the first worker's cores with the quick grid before it
starts anything (a minute or two, shown as it goes), and caches the result. The planner
refines whatever it gets from live steps (`planner.calibration`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import platformdirs

from shared.roofline import ProfileError, cpu_name, load_profile, matching_cpu_profile

log = logging.getLogger(__name__)

QUICK_REPEATS = 2  # timed rounds of the quick grid on first start


def cache_path(model_dir: Path, threads: int, dtype: str, engine: str = "ours") -> Path:
    """Where the profile of this model on this machine at `threads` threads and `dtype`, on
    `engine`, is kept."""
    key = hashlib.sha256((model_dir / "config.json").read_bytes() + cpu_name().encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", model_dir.name)
    suffix = "" if engine == "ours" else f"_{engine}"
    return platformdirs.user_cache_path("slos-serve") / "profiles" / f"{name}_{key}_{dtype}_{threads}t{suffix}.json"


def find(model_dir: Path, threads: int, dtype: str, engine: str = "ours") -> Path | None:
    """The cached profile, else a shipped one that fits (shipped ones are of our engine); None:
    the engine must be profiled."""
    cached = cache_path(model_dir, threads, dtype, engine)
    if cached.is_file():
        try:
            load_profile(cached)
            return cached
        except ProfileError as exc:
            log.warning("ignoring the cached profile: %s", exc)
    return matching_cpu_profile(model_dir, threads) if engine == "ours" else None
