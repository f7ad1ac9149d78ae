"""1F1B's boundary memory follows the pipeline depth, not the number of micro-batches: sent
activations and gradients are released once the receiver has consumed them, measured with the
allocator's own events (not the runtime's stash counter); every schedule still computes the
gradients one process does."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from plait.parallel.pipeline.p2p import PipeComm
from plait.parallel.pipeline.partition import Partition
from plait.parallel.pipeline.runtime import PipelineRuntime
from plait.testing.memory import track_allocations

ROWS, WIDTH = 512, 128  # one micro-batch's boundary tensor: 256 KiB, four times a layer's weight


def _peaks(schedule: str, ms: list[int]) -> dict[int, tuple[int, int]]:
    """{m: (peak bytes allocated during one step, sends still held at the end)} on this pp rank."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH) for _ in range(2)]
    partition = Partition(names=("a", "b"), costs=(1.0, 1.0), bounds=((0, 1), (1, 2)), stages=2,
                          cost="params")
    comm = PipeComm(None, [0, 1])
    runtime = PipelineRuntime({rank: nn.Sequential(layers[rank])}, partition, rank, comm,
                              lambda out, y: ((out - y) ** 2).mean(), schedule, torch.device("cpu"))
    out = {}
    for m in ms:
        batches = [(torch.randn(ROWS, WIDTH), torch.randn(ROWS, WIDTH)) for _ in range(m)]
        runtime.run(batches, contextlib.nullcontext)  # first step: shapes travel, gradients appear
        with track_allocations() as trace:
            runtime.run(batches, contextlib.nullcontext)
        out[m] = (trace.peak, comm.in_flight)
    return out


def test_1f1b_boundary_memory_does_not_grow_with_microbatches(pools):
    """At pp=2, a step of 12 micro-batches peaks no higher than one of 4. Before sends were
    released as they completed, each extra micro-batch kept one more boundary tensor (256 KiB)
    alive on each rank until the end of the step."""
    boundary = ROWS * WIDTH * 4
    for rank, peaks in enumerate(pools(2).run(_peaks, "1f1b", [4, 12])):
        assert peaks[12][0] - peaks[4][0] < boundary // 2, (rank, peaks)
        assert peaks[4][1] == peaks[12][1] == 0, (rank, peaks)  # every send waited on by step end


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)]


def _batches(m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)) for _ in range(m)]


def _pipeline_grads(schedule: str, m: int) -> dict[int, list[torch.Tensor]]:
    """Two steps (the first learns shapes) of 4 layers on 2 ranks; {layer: its gradients}."""
    rank, layers = dist.get_rank(), _layers()
    chunks = 4 if schedule == "interleaved" else 2
    per = 4 // chunks
    bounds = tuple((g * per, (g + 1) * per) for g in range(chunks))
    partition = Partition(names=tuple("abcd"), costs=(1.0,) * 4, bounds=bounds, stages=2, cost="even")
    mine = {g: nn.Sequential(*layers[a:b]) for g, (a, b) in enumerate(bounds) if g % 2 == rank}
    comm = PipeComm(None, [0, 1])
    runtime = PipelineRuntime(mine, partition, rank, comm, _loss, schedule, torch.device("cpu"))
    for _ in range(2):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        runtime.run(_batches(m), contextlib.nullcontext)
    assert comm.in_flight == 0
    return {i: [q.grad.clone() for q in layers[i].parameters()]
            for g, (a, b) in enumerate(bounds) if g % 2 == rank for i in range(a, b)}


@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b", "interleaved"])
def test_released_sends_keep_every_schedule_exact(pools, schedule):
    m = 4
    layers = _layers()
    model = nn.Sequential(*layers)
    sum(_loss(model(x), y) / m for x, y in _batches(m)).backward()
    got = {}
    for per_rank in pools(2).run(_pipeline_grads, schedule, m):
        got.update(per_rank)
    assert sorted(got) == [0, 1, 2, 3]
    for i, layer in enumerate(layers):
        for mine, ref in zip(got[i], layer.parameters()):
            torch.testing.assert_close(mine, ref.grad, rtol=0, atol=1e-6)
