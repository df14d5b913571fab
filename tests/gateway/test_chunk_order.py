"""Token chunks reach the client in output order, once each."""

from __future__ import annotations

from gateway.planner_link import ChunkOrder
from shared.messages import TokenChunk


def chunk(index: int, tokens: list[int], finish: str | None = None) -> TokenChunk:
    return TokenChunk("r", tokens, "".join(f"<{t}>" for t in tokens), finish, 0, index)


def test_overtaking_chunks_wait_and_duplicates_are_dropped() -> None:
    order = ChunkOrder()
    assert order.accept(chunk(1, [8, 9])) == []  # the decode worker's chunk came first
    assert [c.index for c in order.accept(chunk(0, [7]))] == [0, 1]
    assert order.accept(chunk(1, [8, 9])) == []  # seen already
    assert [c.token_ids for c in order.accept(chunk(3, [10], "length"))] == [[10]]
    error = TokenChunk("r", [], "", "error", 0, 0)
    assert order.accept(error) == [error]
