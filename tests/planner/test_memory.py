"""KV memory for promises: a new request's share of what the running promised requests leave
as they grow, checked against the moment-by-moment count; and the SLO policy admitting a burst
of long outputs only as far as their blocks will fit at the end, not only now."""

from __future__ import annotations

import numpy as np
import pytest

from planner import _memory
from planner.memory import promise_blocks, shares
from planner.policies.slos import SLOPolicy
from planner.state import PlannerState, RequestState
from shared.messages import SamplingParams
from shared.slo import SLOTarget
from tests.planner.test_slos_policy import GPU, state, worker


def _by_moment(held, left, prompt, output, num_blocks, block_size) -> float:
    """The largest share, counted at every token written."""
    best = 0.0
    for tau in range(output + 1):
        alive = left >= tau
        used = ((held[alive] + tau) / block_size + 1).sum()
        room = num_blocks - used
        best = max(best, np.inf if room <= 0 else ((prompt + tau) / block_size + 1) / room)
    return best


def test_a_new_requests_share_is_its_largest_at_any_moment_it_runs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        n, m, blocks = int(rng.integers(0, 7)), int(rng.integers(1, 4)), int(rng.integers(10, 120))
        held, left = rng.integers(1, 300, n), rng.integers(0, 400, n)
        prompt, output = rng.integers(1, 300, m), rng.integers(1, 400, m)
        got = shares(held, left, prompt, output, blocks, 16)
        for j in range(m):
            assert got[j] == pytest.approx(_by_moment(held, left, prompt[j], int(output[j]), blocks, 16))


def test_the_kernel_refuses_arrays_that_do_not_match() -> None:
    """`_memory.largest` reads raw buffers: lengths and finish counts out of range are an error,
    not a read past the end."""
    inv, b, a = np.ones(3), np.ones(3), np.ones(2)
    out = np.empty(2)
    _memory.largest(inv, b, a, np.array([0, 3]), out)
    assert out.tolist() == [0.0, 2.0]
    with pytest.raises(ValueError):
        _memory.largest(inv, b, a, np.array([0, 4]), out)
    with pytest.raises(ValueError):
        _memory.largest(inv, np.ones(2), a, np.array([0, 1]), out)
    with pytest.raises(ValueError):
        _memory.largest(inv, b, a, np.array([0, 1], dtype=np.int32), out)


def test_requests_finishing_soon_make_room_for_a_long_one() -> None:
    """Eight running requests fill 86 % of the cache now; each has 100 tokens left. A new one
    of 3,000 tokens fits beside them once they finish, though their largest sizes and its own
    add up to more than the cache."""
    held, left = np.full(8, 1700), np.full(8, 100)
    share = shares(held, left, np.array([100]), np.array([2900]), 1000, 16)[0]
    assert share < 1.0
    assert (held + left).sum() / 16 + 3000 / 16 > 1000
    blocks, total = promise_blocks(held, left, np.array([100]), np.array([2900]), np.array([8]), 500, 1000, 16)
    assert total == 1000 and blocks[0] == int(np.ceil(share * 1000))


def _reasoning(rid: str, prompt: int, think: int) -> RequestState:
    return RequestState(rid, [1] * prompt, SamplingParams(max_tokens=4096), SLOTarget(ttft_ms=5000.0, tpot_ms=200.0),
                        0.0, expected_output=think)


def test_a_burst_of_long_outputs_is_admitted_as_far_as_it_fits_when_grown() -> None:
    """30 requests of 100-token prompts, each expected to write 1,500 tokens, on 1,200 blocks
    (19,200 tokens): all 30 fit now, and at half their expected output (what the reservations
    count) too, but 12 at most fit when they have written it all (12 x 1,600 tokens = 1,200
    blocks, and each one's last block may be part full). The policy promises no more than
    fit at the end, so that no promise has to be preempted."""
    w = worker("w0", blocks=1200)
    reqs = [_reasoning(f"r{i}", 100, 1500) for i in range(30)]
    s = state([w], waiting=reqs)
    decisions = SLOPolicy(GPU, max_spec_len=0).schedule(s, 0.0)
    promised = [rid for rid in decisions.assign if rid not in decisions.best_effort]
    assert 0 < len(promised) <= 12
    assert len(promised) * ((100 + 1500) / 16 + 1) <= 1200


def test_running_promises_that_will_grow_leave_no_room_for_more() -> None:
    """A worker whose promised requests hold little now but will fill its cache as they write
    their expected output promises nothing new, though its blocks are free today."""
    w = worker("w0", blocks=1000)
    running = [_reasoning(f"d{i}", 100, 1500) for i in range(10)]  # 10 x 1,600 tokens: all 1,000 blocks at the end
    waiting = [_reasoning("new", 100, 1500)]
    s: PlannerState = state([w], waiting=waiting, running={"w0": running})
    assert w.unreserved_blocks > 400  # room today, at the reservations' count
    decisions = SLOPolicy(GPU, max_spec_len=0).schedule(s, 0.0)
    assert "new" not in decisions.assign or "new" in decisions.best_effort
