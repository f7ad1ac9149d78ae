"""Sets of time intervals: union, intersection, difference, total length.

A set is a sorted list of disjoint half-open (start, end) pairs. Trace analysis builds one per
kind of activity on a thread and partitions a step's window with them.
"""

from __future__ import annotations

from typing import Iterable

Intervals = list[tuple[float, float]]


def union(spans: Iterable[tuple[float, float]]) -> Intervals:
    """Merge possibly overlapping spans into a sorted disjoint set (empty spans dropped)."""
    out: Intervals = []
    for a, b in sorted((a, b) for a, b in spans if b > a):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect(x: Intervals, y: Intervals) -> Intervals:
    """The parts covered by both disjoint sorted sets."""
    out: Intervals = []
    i = j = 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if b > a:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(x: Intervals, y: Intervals) -> Intervals:
    """The parts of `x` not covered by `y` (both disjoint and sorted)."""
    out: Intervals = []
    j = 0
    for a, b in x:
        while j < len(y) and y[j][1] <= a:
            j += 1
        k, start = j, a
        while k < len(y) and y[k][0] < b:
            if y[k][0] > start:
                out.append((start, y[k][0]))
            start = max(start, y[k][1])
            k += 1
        if start < b:
            out.append((start, b))
    return out


def clip(x: Intervals, lo: float, hi: float) -> Intervals:
    """`x` restricted to [lo, hi)."""
    return intersect(x, [(lo, hi)]) if hi > lo else []


def length(x: Intervals) -> float:
    return sum(b - a for a, b in x)
