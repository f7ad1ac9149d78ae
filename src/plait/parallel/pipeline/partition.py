"""Splitting an ordered layer list into contiguous pipeline chunks, balanced by a chosen cost.

Costs per layer: "params" (parameter count), "flops" (training FLOPs per sample: analytic where
the model gives them, else counted by torch's FlopCounterMode) or "time" (measured forward +
backward on an example batch; rank 0's measurement is broadcast so every rank splits alike).
Measured time charges the loss to the last layer, which runs it (on the CPU the cross-entropy
and final norm cost more than their FLOPs suggest, and the last stage is otherwise the slowest).

Non-interleaved schedules cut the layers into p chunks minimising the most expensive chunk; with
stage speeds (uneven hardware) a chunk's cost is divided by its stage's speed, so a stage twice as
fast takes layers costing about twice as much.
Interleaved schedules cut the repeated blocks evenly into p·v chunks, as Megatron-LM does (its
schedule assumes equal chunks); the layers before the blocks join the first chunk and those after
join the last. Chunk g runs on pipeline rank g mod p.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from plait.balance import balance
from plait.config import PARTITION_COSTS, check_layers
from plait.errors import PlanError
from plait.parallel.pipeline.layers import PipelineSpec

COSTS = PARTITION_COSTS


@dataclass(frozen=True)
class Partition:
    """Which layers each chunk holds; chunk g runs on pipeline rank g mod `stages`."""

    names: tuple[str, ...]          # layer names, in order
    costs: tuple[float, ...]        # per layer
    bounds: tuple[tuple[int, int], ...]  # per chunk: [start, end) layer indices
    stages: int                     # pipeline ranks p
    cost: str                       # which cost balanced it ("even" for interleaved splits)
    speeds: tuple[float, ...] = ()  # relative speed per stage (empty: equal)

    @property
    def num_chunks(self) -> int:
        return len(self.bounds)

    @property
    def virtual_stages(self) -> int:
        return self.num_chunks // self.stages

    def rank_of(self, chunk: int) -> int:
        return chunk % self.stages

    def chunks_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_chunks, self.stages))

    def chunk_cost(self, chunk: int) -> float:
        a, b = self.bounds[chunk]
        return sum(self.costs[a:b])

    def __str__(self) -> str:
        total = sum(self.costs) or 1.0
        lines = [f"pipeline partition: {self.num_chunks} chunks on {self.stages} stages, "
                 f"balanced by {self.cost}"
                 + (f" / stage speeds {', '.join(f'{s:.3g}' for s in self.speeds)}" if self.speeds else "")]
        for g, (a, b) in enumerate(self.bounds):
            names = self.names[a] if b - a == 1 else f"{self.names[a]} .. {self.names[b - 1]}"
            lines.append(f"  chunk {g} (stage {self.rank_of(g)}): layers {a}-{b - 1} [{names}] "
                         f"cost {self.chunk_cost(g):.4g} ({100 * self.chunk_cost(g) / total:.1f}%)")
        return "\n".join(lines)


def even_blocks(spec: PipelineSpec, chunks: int) -> list[tuple[int, int]]:
    """Blocks split evenly into `chunks`; leading layers join the first, trailing the last."""
    if spec.num_blocks % chunks:
        raise PlanError(f"{spec.num_blocks} blocks do not split evenly into {chunks} chunks")
    per = spec.num_blocks // chunks
    starts = [spec.first_block + g * per for g in range(chunks)]
    ends = starts[1:] + [len(spec)]
    starts[0] = 0
    return list(zip(starts, ends))


def layer_costs(spec: PipelineSpec, cost: str, group: "dist.ProcessGroup | None" = None) -> list[float]:
    """Each layer's cost; "time" is measured here and broadcast from the group's first rank."""
    if cost == "params":
        return [float(sum(p.numel() for p in layer.module.parameters())) for layer in spec.layers]
    if cost == "flops":
        return _flops(spec)
    if cost == "time":
        times = _measure_times(spec)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            box = [times]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
            times = box[0]
        return times
    raise PlanError(f"parallel.partition={cost!r} is invalid; valid: {', '.join(COSTS)}")


def _flops(spec: PipelineSpec) -> list[float]:
    from torch.utils.flop_counter import FlopCounterMode

    out, x = [], spec.example_input(1)
    for layer in spec.layers:
        y = _run_layer(layer.module, x)
        if layer.flops_per_sample is not None:
            out.append(float(layer.flops_per_sample))
        else:
            with FlopCounterMode(display=False) as counter:
                _run_layer(layer.module, x, backward=True)
            out.append(float(counter.get_total_flops()))
        x = y
    return out


def _measure_times(spec: PipelineSpec, repeats: int = 3) -> list[float]:
    out, x = [], spec.example_input(1)
    target = spec.example_target(1) if spec.example_target is not None else None
    for i, layer in enumerate(spec.layers):
        loss = None
        if i == len(spec) - 1 and target is not None:
            loss = lambda y: spec.loss_fn(y, target)  # noqa: E731
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _run_layer(layer.module, x, backward=True, loss=loss)
            samples.append(time.perf_counter() - t0)
        out.append(statistics.median(samples))
        x = _run_layer(layer.module, x)
    return out


def _run_layer(module: torch.nn.Module, x: torch.Tensor, backward: bool = False,
               loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward (and backward of `loss(output)`, else of the output's sum) in eval mode, leaving
    no gradients behind."""
    was_training = module.training
    module.eval()  # no dropout: measuring must not draw from the RNG
    try:
        if not backward:
            with torch.no_grad():
                return module(x)
        inp = x.detach().requires_grad_(x.is_floating_point())
        y = module(inp)
        (loss(y) if loss is not None else y.float().sum()).backward()
        for p in module.parameters():
            p.grad = None
        return y.detach()
    finally:
        module.train(was_training)


def make_partition(spec: PipelineSpec, stages: int, virtual_stages: int = 1, cost: str = "params",
                   interleaved: bool = False, group: "dist.ProcessGroup | None" = None,
                   speeds: list[float] | None = None) -> Partition:
    """Partition `spec` for `stages` pipeline ranks (× `virtual_stages` chunks each when interleaved),
    each stage's share in proportion to its relative speed in `speeds` (non-interleaved only)."""
    if cost not in COSTS:
        raise PlanError(f"parallel.partition={cost!r} is invalid; valid: {', '.join(COSTS)}")
    if speeds and interleaved:
        raise PlanError("stage speeds do not apply to the interleaved schedule, which cuts the blocks "
                        "evenly; use gpipe or 1f1b, or no stage speeds")
    check_layers(len(spec), spec.num_blocks, stages, virtual_stages, interleaved, error=PlanError)
    costs = layer_costs(spec, cost, group)
    if interleaved:
        bounds, label = even_blocks(spec, stages * virtual_stages), f"even blocks ({cost} shown)"
    else:
        bounds, label = balance(costs, stages, list(speeds) if speeds else None), cost
    return Partition(tuple(spec.names), tuple(costs), tuple(bounds), stages, label,
                     tuple(speeds) if speeds else ())
