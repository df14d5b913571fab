"""The requests an admission plan weighs: each one's prompt left, KV cost, deadline, TPOT and
whether it is promised already, one at a time (`Job`) or as columns (`Jobs`), and which of a
burst one call plans (`earliest`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONSIDERED = 256  # waiting requests, earliest deadlines first, that one call plans at most


@dataclass(frozen=True)
class Job:
    """A request that still has prompt to prefill."""

    request_id: str
    prefill_tokens: int
    blocks: int  # its KV cost: the blocks it will hold at most, or its share of them (`planner.memory`)
    deadline: float  # absolute TTFT deadline; inf when it has none
    tpot_s: float | None  # its decode objective; None when it has none
    promised: bool = False  # admitted earlier: must be kept
    context: int = 0  # KV tokens each of its decode steps reads, on average over its life
    cost: float | None = None  # budget tokens its prefill takes (`prefill_cost`); None: its tokens
    done: int = 0  # prompt tokens already in the cache, which its chunks attend to
    alpha: float | None = None  # per-token acceptance of its class's proposals; None: the replica's


@dataclass(frozen=True)
class Jobs:
    """Requests with prompt left to prefill, as columns (see `Job`)."""

    ids: np.ndarray  # object
    tokens: np.ndarray
    blocks: np.ndarray
    deadline: np.ndarray
    tpot: np.ndarray  # nan for none
    promised: np.ndarray
    context: np.ndarray
    done: np.ndarray  # prompt tokens already in the cache
    alpha: np.ndarray  # per-token acceptance of its class's proposals; nan: the replica's
    cost: np.ndarray  # budget tokens each prefill takes (float)

    @classmethod
    def of(cls, jobs: list[Job]) -> Jobs:
        n = len(jobs)
        return cls(np.array([j.request_id for j in jobs], dtype=object).reshape(n),
                   np.fromiter((j.prefill_tokens for j in jobs), np.int64, n),
                   np.fromiter((j.blocks for j in jobs), np.int64, n),
                   np.fromiter((j.deadline for j in jobs), np.float64, n),
                   np.fromiter((math.nan if j.tpot_s is None else j.tpot_s for j in jobs), np.float64, n),
                   np.fromiter((j.promised for j in jobs), bool, n),
                   np.fromiter((j.context for j in jobs), np.int64, n),
                   np.fromiter((j.done for j in jobs), np.int64, n),
                   np.fromiter((math.nan if j.alpha is None else j.alpha for j in jobs), np.float64, n),
                   np.fromiter((j.prefill_tokens if j.cost is None else j.cost for j in jobs), np.float64, n))

    def __add__(self, other: Jobs) -> Jobs:
        return Jobs(*(np.concatenate([a, b]) for a, b in zip(self._columns(), other._columns())))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> Jobs:
        return Jobs(*(c[rows] for c in self._columns()))

    def _columns(self) -> tuple[np.ndarray, ...]:
        return (self.ids, self.tokens, self.blocks, self.deadline, self.tpot, self.promised, self.context, self.done,
                self.alpha, self.cost)


def earliest(deadline: np.ndarray, n: int = CONSIDERED) -> np.ndarray:
    """The rows of the `n` earliest deadlines (the first in row order among equal ones): the new
    requests one call plans. A caller with many may cut its queue to these first."""
    if len(deadline) <= n:
        return np.ones(len(deadline), dtype=bool)
    kth = np.partition(deadline, n - 1)[n - 1]
    out = deadline < kth
    out[np.flatnonzero(deadline == kth)[: n - int(out.sum())]] = True
    return out
