"""Training on uneven hardware: speeds per rank, the uneven data-parallel split, stage speeds.

Data parallelism: each draw of dp × micro_batch_size sequences is split over the dp ranks in
proportion to their speeds (:func:`split_counts`), so a rank twice as fast gets twice the samples
and the ranks finish together. Each rank's gradient is the mean over its own samples; weighting it
by w_r = n_r · dp / N before the usual average over dp (:func:`sample_weights`, applied by the
gradient reducer) makes the average the mean over all N samples: exactly the even split's
gradient, up to the order of floating-point sums.

Pipelines: stage speeds scale the partitioner's per-layer costs (`parallel.stage_speeds`); a
stage's speed is that of the slowest rank holding it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import ConfigError
from plait.mesh import MeshShape


def split_counts(total: int, speeds: Sequence[float]) -> list[int]:
    """`total` samples split in proportion to `speeds`: at least 1 each, summing to `total`.

    Each rank gets the floor of its exact share (at least 1); the samples left go to the largest
    remainders, and a surplus from the at-least-one rule comes off the most over-served ranks
    (ties to the lower rank), so every rank computes the same split from the same speeds.
    """
    n = len(speeds)
    if n == 0 or any(not (s > 0 and math.isfinite(s)) for s in speeds):
        raise ConfigError(f"speeds {list(speeds)} must be one finite value > 0 per rank")
    if total < n:
        raise ConfigError(f"{total} samples cannot give each of {n} ranks at least one")
    share = [total * s / sum(speeds) for s in speeds]
    counts = [max(1, math.floor(x)) for x in share]
    while sum(counts) < total:
        r = max(range(n), key=lambda r: (share[r] - counts[r], -r))
        counts[r] += 1
    while sum(counts) > total:
        r = max((r for r in range(n) if counts[r] > 1), key=lambda r: (counts[r] - share[r], -r))
        counts[r] -= 1
    return counts


def sample_weights(counts: Sequence[int]) -> list[float]:
    """Per-rank gradient weights n_r · k / N that turn an average over k ranks into the
    sample-weighted mean; all 1.0 for an even split."""
    total, k = sum(counts), len(counts)
    return [c * k / total for c in counts]


def dp_speeds(busy_s: Sequence[float], samples: Sequence[int], shape: MeshShape) -> list[float]:
    """Samples per second of each dp replica from every rank's busy seconds per step.

    `busy_s` and `samples` are per global rank. A replica's ranks (its pipeline stages and tp
    shards) work on the same samples, so the replica goes at the pace of its busiest rank.
    """
    out = []
    for d in range(shape.dp):
        ranks = [shape.rank_of(d, p, t) for p in range(shape.pp) for t in range(shape.tp)]
        busiest = max(busy_s[r] for r in ranks)
        out.append(samples[ranks[0]] / max(busiest, 1e-9))
    return out


def stage_speeds(rank_speeds: Sequence[float], shape: MeshShape) -> list[float]:
    """Each pipeline stage's speed: that of its slowest rank (dp replicas and tp shards wait for it)."""
    return [min(rank_speeds[shape.rank_of(d, p, t)] for d in range(shape.dp) for t in range(shape.tp))
            for p in range(shape.pp)]


def replica_speeds(rank_speeds: Sequence[float], shape: MeshShape) -> list[float]:
    """Each dp replica's speed from given per-rank speeds: that of its slowest rank."""
    return [min(rank_speeds[shape.rank_of(d, p, t)] for p in range(shape.pp) for t in range(shape.tp))
            for d in range(shape.dp)]


def measure_speed(model: nn.Module, batch_size: int = 1, repeats: int = 3) -> float:
    """This process's speed: 1 / seconds of one forward and backward pass of `model` (through its
    pipeline layer list and loss) on an example batch of `batch_size`; the median of `repeats`
    passes after one warm-up. Every rank holds the whole model before the pipeline cuts it, so
    one micro-batch's activations are all this adds. No gradients are left behind and no
    dropout is drawn."""
    spec_fn = getattr(model, "pipeline_spec", None)
    if not callable(spec_fn):
        raise ConfigError(f"{type(model).__name__} has no pipeline_spec(): its speed cannot be "
                          "measured; set profile.speeds instead")
    spec = spec_fn()
    device = next(model.parameters()).device
    example = spec.example_input(batch_size).to(device)
    target = spec.example_target(batch_size).to(device) if spec.example_target is not None else None
    was_training = model.training
    model.eval()
    try:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            x = example
            for layer in spec.layers:
                x = layer.module(x)
            (spec.loss_fn(x, target) if target is not None else x.float().sum()).backward()
            if i:  # the first pass warms caches and allocators
                times.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    finally:
        model.train(was_training)
    return 1.0 / max(statistics.median(times), 1e-9)


def gather_floats(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values` (same length everywhere), by rank; collective over the world."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine.tolist()]
    world = dist.get_world_size()
    every = torch.empty(world * len(values), dtype=torch.float64, device=device)
    # torch 2.13 names it all_gather_single; older versions only have all_gather_into_tensor.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(every, mine)
    return every.view(world, len(values)).tolist()
