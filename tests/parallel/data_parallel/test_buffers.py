"""Buffers (BatchNorm running statistics) stay equal over the dp group, as under torch DDP with
broadcast_buffers=True: the reducer broadcasts them from the group's first rank after every
synchronised backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from plait.parallel.data_parallel.reducer import GradientReducer

STEPS, ACCUM = 3, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(kind: str, mode: str = "bucketed") -> dict:
    """STEPS steps of ACCUM micro-batches each on rank-dependent data; what the tests compare."""
    model = _model()
    if kind == "ddp":
        wrapped = DistributedDataParallel(model)
        no_sync = wrapped.no_sync
    else:
        reducer = GradientReducer(model, mode=mode, broadcast_buffers=kind == "plait")
        wrapped, no_sync = model, reducer.no_sync
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own data
    for _ in range(STEPS):
        for i in range(ACCUM):
            x, y = torch.randn(4, 6, generator=g) * (1 + dist.get_rank()), torch.randn(4, 2, generator=g)
            with no_sync() if i < ACCUM - 1 else contextlib.nullcontext():
                (((wrapped(x) - y) ** 2).mean() / ACCUM).backward()
        opt.step()
        opt.zero_grad()
    return {"buffers": {k: v.clone() for k, v in model.named_buffers()},
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def _runs(mode: str) -> dict[str, dict]:
    return {kind: _train(kind, mode) for kind in ("plait", "local", "ddp")}


@pytest.mark.parametrize("mode", ["bucketed", "naive"])
def test_batchnorm_buffers_are_equal_across_ranks_and_to_ddp(pools, mode):
    r0, r1 = pools(2).run(_runs, mode)
    for name in r0["plait"]["buffers"]:  # running_mean, running_var, num_batches_tracked
        assert torch.equal(r0["plait"]["buffers"][name], r1["plait"]["buffers"][name]), name
        # DDP broadcasts before each forward; the first rank's values are the same.
        torch.testing.assert_close(r0["plait"]["buffers"][name], r0["ddp"]["buffers"][name],
                                   rtol=0, atol=1e-6)
    for name in r0["plait"]["params"]:
        torch.testing.assert_close(r0["plait"]["params"][name], r0["ddp"]["params"][name],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(r1["plait"]["params"][name], r0["ddp"]["params"][name],
                                   rtol=0, atol=1e-6)
    # broadcast_buffers=False keeps each rank's own statistics (what drifted before)
    assert not torch.equal(r0["local"]["buffers"]["1.running_mean"], r1["local"]["buffers"]["1.running_mean"])
