"""The KV memory new promises may take beside the promised requests running on a replica.

Each running request holds its prompt and what it has written, and grows until it has written
the output it is expected to write, then frees it all. Their sizes now undersell what they will
need: requests admitted together grow together, and a burst of long outputs that fits today
overflows the cache a minute later, when the worker has to preempt promised requests to go on.
Their largest sizes added up oversell it: requests that finish sooner make room for the others.
So a new request is priced by the largest share it takes, at any moment while it runs, of the
blocks the running requests leave free at that moment; new requests whose shares add up to at
most 1 fit beside them all along (a sum's share is at most the sum of the shares).

Time is counted in tokens written, one a step for every request alike; a block count is a
request's tokens over the block size, plus one for its last block, which may be part full.
"""

from __future__ import annotations

import numpy as np

from planner import _memory


def shares(held: np.ndarray, left: np.ndarray, prompt: np.ndarray, output: np.ndarray, num_blocks: int,
           block_size: int) -> np.ndarray:
    """For each new request (holding `prompt` tokens once prefilled, then writing `output`),
    its largest share of the blocks the running requests (holding `held`, writing `left` more)
    leave free while it runs; inf where they leave none at some moment it would be running.

    Between two of the running requests' finishes the same ones run, all growing, so the share
    of a new request, which grows too, is largest at the end of the stretch: it is enough to look
    just before each finish, with the one finishing still holding its blocks, and just before the
    new request's own end."""
    order = np.argsort(left, kind="stable")
    held, left = held[order].astype(np.float64), left[order].astype(np.float64)
    n = len(held)
    after = np.concatenate([np.cumsum(held[::-1])[::-1], [0.0]])  # held by those from k on
    alive = np.arange(n, -1, -1, dtype=np.float64)  # running from the k-th finish on
    prompt, output = prompt.astype(np.float64), output.astype(np.float64)
    # just before the k-th finish, for each new request still running then (the finishes up to
    # `ends`, as `left` is sorted): its size over the room, (prompt/bs + 1 + left/bs) / room
    room = num_blocks - ((after[:-1] + alive[:-1] * left) / block_size + alive[:-1])
    ends = np.searchsorted(left, output, side="right")
    inv = np.divide(1.0, room, out=np.zeros(n), where=room > 0)
    during = np.empty(len(prompt))
    _memory.largest(inv, left / block_size * inv, prompt / block_size + 1, ends.astype(np.int64), during)
    full = np.flatnonzero(room <= 0)
    during[ends > (full[0] if len(full) else n)] = np.inf  # running when none is left
    # just before its own end: the running requests not finished by then have grown as much
    k = np.searchsorted(left, output, side="left")
    end_room = num_blocks - ((after[k] + alive[k] * output) / block_size + alive[k])
    end_size = (prompt + output) / block_size + 1
    with np.errstate(divide="ignore"):
        at_end = np.where(end_room > 0, end_size / end_room, np.inf)
    return np.maximum(during, at_end)


def promise_blocks(held: np.ndarray, left: np.ndarray, prompt: np.ndarray, output: np.ndarray, reserve: np.ndarray,
                   free: int, num_blocks: int, block_size: int) -> tuple[np.ndarray, int]:
    """New requests' KV costs for the admission program, and the total they must fit in: each
    one's larger share, of the blocks the running promises leave as they grow (`shares`) or of
    the `free` blocks now that its reservation (`reserve` blocks) takes, counted in blocks of
    the cache, so that costs adding up to `num_blocks` keep both."""
    share = shares(held, left, prompt, output, num_blocks, block_size)
    now = reserve / free if free > 0 else np.full(len(reserve), np.inf)
    cost = np.maximum(share, now)
    blocks = np.where(np.isfinite(cost), np.ceil(cost * num_blocks), num_blocks + 1)
    return blocks.astype(np.int64), num_blocks
