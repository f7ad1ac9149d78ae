"""Interval arithmetic behind the compute / communication / idle split."""

from __future__ import annotations

from plait.profile.intervals import clip, intersect, length, subtract, union


def test_union_merges_overlaps_and_drops_empty_spans():
    assert union([(5, 7), (0, 2), (1, 3), (4, 4), (6, 9)]) == [(0, 3), (5, 9)]
    assert union([(0, 1), (1, 2)]) == [(0, 2)]


def test_intersect_and_subtract_partition_a_set():
    x = union([(0, 10), (20, 30)])
    y = union([(5, 25), (28, 40)])
    both, only_x = intersect(x, y), subtract(x, y)
    assert both == [(5, 10), (20, 25), (28, 30)]
    assert only_x == [(0, 5), (25, 28)]
    assert length(both) + length(only_x) == length(x)


def test_subtract_with_holes_and_clip():
    assert subtract([(0, 10)], [(2, 3), (5, 6), (9, 12)]) == [(0, 2), (3, 5), (6, 9)]
    assert subtract([(0, 10)], []) == [(0, 10)]
    assert subtract([], [(0, 1)]) == []
    assert clip([(0, 10), (15, 20)], 5, 17) == [(5, 10), (15, 17)]
    assert clip([(0, 10)], 5, 5) == []
