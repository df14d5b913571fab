"""The bus benchmark times both kinds of sockets at the size asked."""

from __future__ import annotations

from bench.bus_bench import measure


def test_both_kinds_are_timed() -> None:
    rows = measure(200, 50)
    assert [(r.sockets, r.size) for r in rows] == [("plain", 200), ("curve", 200)]
    assert all(0 < r.median_us <= r.p99_us for r in rows)
