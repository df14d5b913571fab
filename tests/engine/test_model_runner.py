from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.model_runner import PADDING_MAX, similar_lengths


@given(st.lists(st.integers(1, 200), max_size=80), st.sampled_from([float("inf"), 64, 256]))
def test_groups_bound_their_padding_and_keep_every_sequence(widths: list[int], most: float) -> None:
    short = [(i, 16 * w - 1, 1, list(range(w))) for i, w in enumerate(widths)]
    groups = similar_lengths(short, most)
    assert sorted(s[0] for g in groups for s in g) == list(range(len(widths)))
    for g in groups:
        width = len(g[0][3])
        assert all(len(s[3]) <= width for s in g)  # the first is the widest: the padding width
        if len(g) > 1:
            assert len(g) * width <= min(most, (1 + PADDING_MAX) * sum(len(s[3]) for s in g))


def test_mixed_lengths_split_and_equal_ones_do_not() -> None:
    same = [(i, 100, 1, [0] * 7) for i in range(30)]
    assert len(similar_lengths(same)) == 1
    mixed = [(0, 1000, 1, [0] * 63), (1, 10, 1, [0]), (2, 1000, 1, [0] * 63)]
    assert [[s[0] for s in g] for g in similar_lengths(mixed)] == [[0, 2], [1]]
