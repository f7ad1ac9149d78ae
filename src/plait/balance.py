"""A contiguous, balanced split of a cost list: the pipeline partitioner's core, pure Python so the
planner (which imports no torch) computes exactly the cut a real run makes."""

from __future__ import annotations

from plait.errors import PlanError


def balance(costs: list[float], parts: int, speeds: list[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous split of `costs` into `parts` non-empty runs minimising the largest run's sum
    (divided by run k's speed `speeds[k]`, when given: the slowest run's time).

    Dynamic programme over (layers used, parts used); ties go to the earliest cut, so every rank
    computes the same split.
    """
    n = len(costs)
    if parts > n:
        raise PlanError(f"{parts} pipeline chunks need at least {parts} layers; the model has {n}")
    if speeds is not None and (len(speeds) != parts or any(not s > 0 for s in speeds)):
        raise PlanError(f"stage speeds {speeds} must give each of the {parts} chunks a speed > 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest possible maximum when the first i layers form k parts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                run = prefix[i] - prefix[j]
                value = max(best[k - 1][j], run / speeds[k - 1] if speeds is not None else run)
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]
