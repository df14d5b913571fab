"""The requests a plan weighs, as columns: built from rows and back, and the cut of a burst to
its earliest deadlines."""

from __future__ import annotations

import math

import numpy as np

from planner.jobs import CONSIDERED, Job, Jobs, earliest


def test_columns_keep_every_field_of_every_request() -> None:
    a = Job("a", 100, 7, 1.5, 0.05, promised=True, context=900, cost=130.0, done=20, alpha=0.7)
    b = Job("b", 40, 3, math.inf, None)
    jobs = Jobs.of([a]) + Jobs.of([b])
    assert jobs.ids.tolist() == ["a", "b"] and jobs.tokens.tolist() == [100, 40] and jobs.blocks.tolist() == [7, 3]
    assert jobs.deadline.tolist() == [1.5, math.inf] and jobs.tpot[0] == 0.05 and math.isnan(jobs.tpot[1])
    assert jobs.promised.tolist() == [True, False] and jobs.context.tolist() == [900, 0]
    assert jobs.done.tolist() == [20, 0] and jobs.alpha[0] == 0.7 and math.isnan(jobs.alpha[1])
    assert jobs.cost.tolist() == [130.0, 40.0]  # no cost given: its tokens
    assert jobs.take(np.array([1])).ids.tolist() == ["b"] and len(Jobs.of([])) == 0


def test_earliest_picks_what_a_stable_sort_by_deadline_puts_first() -> None:
    """The cut a caller may make before pricing a burst is the one the plan makes."""
    rng = np.random.default_rng(3)
    for n in (0, 5, 300, 2_000):
        deadline = rng.choice([0.5, 1.0, 2.0, np.inf], size=n)  # many ties, and requests with no deadline
        first = np.zeros(n, dtype=bool)
        first[np.argsort(deadline, kind="stable")[:CONSIDERED]] = True
        assert (earliest(deadline) == first).all()
