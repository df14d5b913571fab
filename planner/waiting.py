"""The requests waiting for a worker, kept as numpy columns between scheduling calls.

A burst can leave thousands of requests waiting, and a policy that looked at each one as an
object on every call would spend its time budget doing only that. What admission needs of a
waiting request does not change while it waits (its prompt, the KV it will hold, its TTFT
deadline and TPOT, the context its decode steps will read), so it is written into columns once,
on arrival, in arrival order. Leaving the queue marks a row dead; dead rows are compacted away
when they outnumber the live ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from planner.state import RequestState

_NO_ROWS = np.zeros(0, dtype=np.int64)
_COLUMNS = {"prefill": np.int64, "whole": np.int64, "held": np.int64, "output": np.int64, "deadline": np.float64,
            "tpot": np.float64, "context": np.int64, "parked": np.bool_, "live": np.bool_, "order": np.int64,
            "klass": np.int64}


@dataclass(frozen=True)
class Rows:
    """The live waiting requests, in arrival order."""

    ids: np.ndarray  # object: request ids
    prefill: np.ndarray  # prompt tokens to prefill (with any output resumed)
    whole: np.ndarray  # KV tokens it holds on a worker that decodes it: prompt and planned output
    held: np.ndarray  # KV tokens it holds once prefilled: prompt and any output resumed
    output: np.ndarray  # output tokens it is expected to write
    deadline: np.ndarray  # TTFT deadline; inf for none
    tpot: np.ndarray  # TPOT of its first decoded tokens, seconds; nan for none
    context: np.ndarray  # KV tokens a decode step of it reads, on average over its life
    parked: np.ndarray  # in the best-effort queue
    slot: np.ndarray  # row in the queue's columns, increasing
    order: np.ndarray  # how many requests joined the queue before it, ever
    where: dict[str, int]  # request id -> slot
    klass: np.ndarray  # its SLO class, as an index into `classes`
    classes: list[str | None]  # every SLO class the queue has seen

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, request_ids: list[str]) -> np.ndarray:
        """The rows of these requests (ids not waiting are ignored)."""
        out = np.zeros(len(self.ids), dtype=bool)
        slots = [self.where[r] for r in request_ids if r in self.where]
        out[np.searchsorted(self.slot, slots)] = True
        return out

    def plain(self) -> np.ndarray:
        """The rows of requests without objectives: best effort, with nothing to be late for."""
        return np.isinf(self.deadline) & np.isnan(self.tpot)


class WaitingQueue:
    def __init__(self) -> None:
        self._ids = np.empty(64, dtype=object)
        self._size = 0  # rows written, live or dead
        self._joined = 0  # requests added, ever
        self._row: dict[str, int] = {}
        self._cols = {name: np.zeros(64, dtype) for name, dtype in _COLUMNS.items()}
        self._classes: dict[str | None, int] = {}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._row

    def __iter__(self) -> Iterator[str]:
        """Request ids in arrival order."""
        return iter(list(self._row))

    def add(self, req: RequestState) -> None:
        n = self._size
        if n == len(self._ids):
            self._ids = np.concatenate([self._ids, np.empty(n, dtype=object)])
            self._cols = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in self._cols.items()}
        tpot = req.tpot_s
        values = {"prefill": req.prefill_left, "whole": req.tokens_on("colocated"),
                  "held": req.prompt_len + req.num_output, "output": req.output_left(), "deadline": req.deadline,
                  "tpot": math.nan if tpot is None else tpot,
                  "context": req.life_context(),
                  "parked": req.parked, "live": True, "order": self._joined,
                  "klass": self._classes.setdefault(req.slo_class, len(self._classes))}
        for name, value in values.items():
            self._cols[name][n] = value
        self._ids[n] = req.request_id
        self._row[req.request_id] = n
        self._size += 1
        self._joined += 1

    def discard(self, request_id: str) -> None:
        row = self._row.pop(request_id, None)
        if row is None:
            return
        self._cols["live"][row] = False
        if self._size > 64 and len(self._row) < self._size // 2:
            self._compact()

    def park(self, request_id: str) -> None:
        self._cols["parked"][self._row[request_id]] = True

    def rows(self) -> Rows:
        live = np.flatnonzero(self._cols["live"][:self._size]) if self._row else _NO_ROWS  # most calls: empty
        c = self._cols
        return Rows(self._ids[live], c["prefill"][live], c["whole"][live], c["held"][live], c["output"][live],
                    c["deadline"][live], c["tpot"][live], c["context"][live], c["parked"][live], live,
                    c["order"][live], self._row, c["klass"][live], list(self._classes))

    def _compact(self) -> None:
        live = np.flatnonzero(self._cols["live"][:self._size])
        size = max(64, 2 * len(live))
        ids = np.empty(size, dtype=object)
        ids[:len(live)] = self._ids[live]
        self._ids, self._size = ids, len(live)
        self._row = {rid: i for i, rid in enumerate(ids[:len(live)].tolist())}
        fresh = {name: np.zeros(size, dtype) for name, dtype in _COLUMNS.items()}
        for name, col in self._cols.items():
            fresh[name][:len(live)] = col[live]
        self._cols = fresh
