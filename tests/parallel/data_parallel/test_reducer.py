"""Data-parallel reducer: parity with one process and with torch DDP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.parallel.data_parallel.reducer import GradientReducer
from tests.helpers import tiny_model_config


def _global_batch(n: int = 8, t: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, t + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _reference_grads(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    x, y = _global_batch(seed=seed)
    model(x, y)[1].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _dp_grads(mode: str, bucket_mb: float):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=bucket_mb, mode=mode)
    x, y = _global_batch()
    per = x.size(0) // mesh.dp_size
    sl = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    model(x[sl], y[sl])[1].backward()
    reducer.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode,bucket_mb", [("bucketed", 25.0), ("bucketed", 0.01), ("naive", 25.0)])
def test_reducer_gradients_match_one_process(pools, world, mode, bucket_mb):
    ref = _reference_grads()
    for grads in pools(world).run(_dp_grads, mode, bucket_mb):
        for name, g in grads.items():
            assert torch.allclose(g, ref[name], atol=1e-6, rtol=0), name


def _ours_vs_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    ours = GPT(tiny_model_config())
    torch.manual_seed(0)
    theirs = DDP(GPT(tiny_model_config()), bucket_cap_mb=0.01)
    reducer = GradientReducer(ours, mesh.dp_group, bucket_mb=0.01)
    x, y = _global_batch(seed=mesh.rank + 10)  # different data on each rank
    ours(x, y)[1].backward()
    theirs(x, y)[1].backward()
    reducer.remove()
    return max((a.grad - b.grad).abs().max().item()
               for a, b in zip(ours.parameters(), theirs.module.parameters()))


def test_reducer_matches_torch_ddp(pools):
    assert max(pools(2).run(_ours_vs_ddp)) < 1e-7


class _Branchy(nn.Module):
    """`a` is used on every rank, `b` only on rank 0, `c` never."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x, use_b: bool):
        y = self.a(x)
        return self.b(y) if use_b else y


def _unused_params(mode: str):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = _Branchy()
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=1e-5, mode=mode)
    x = torch.ones(2, 4) * (mesh.rank + 1)
    model(x, use_b=mesh.rank == 0).sum().backward()
    out = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    reducer.remove()
    return out


@pytest.mark.parametrize("mode", ["bucketed", "naive"])
def test_reducer_handles_parameters_without_gradient(pools, mode):
    r0, r1 = pools(2).run(_unused_params, mode)
    torch.manual_seed(0)
    model = _Branchy()
    (model(torch.ones(2, 4), True).sum() + model(torch.ones(2, 4) * 2, False).sum()).backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            assert r0[name] is None and r1[name] is None, name
        else:
            assert torch.allclose(r0[name], p.grad / 2, atol=1e-6), name
            assert torch.equal(r0[name], r1[name]), name


def _accumulate(world_accum: int):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=0.01)
    x, y = _global_batch()
    per = x.size(0) // mesh.dp_size
    xs, ys = x[mesh.dp_rank * per:(mesh.dp_rank + 1) * per], y[mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
    micro = per // world_accum
    for i in range(world_accum):
        loss = model(xs[i * micro:(i + 1) * micro], ys[i * micro:(i + 1) * micro])[1] / world_accum
        if i < world_accum - 1:
            with reducer.no_sync():
                loss.backward()
        else:
            loss.backward()
    reducer.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_no_sync_accumulation_matches_one_process(pools):
    ref = _reference_grads()
    for grads in pools(2).run(_accumulate, 2):
        for name, g in grads.items():
            assert torch.allclose(g, ref[name], atol=1e-6, rtol=0), name


def _two_steps_zeroing_in_place():
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=0.01)
    out = []
    for seed in (0, 1):
        model.zero_grad(set_to_none=False)  # .grad tensors are the reducer's bucket views here
        x, y = _global_batch(seed=seed)
        per = x.size(0) // mesh.dp_size
        sl = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
        model(x[sl], y[sl])[1].backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    reducer.remove()
    return out


def test_gradients_stay_right_when_zeroed_in_place(pools):
    for step_grads in pools(2).run(_two_steps_zeroing_in_place):
        for seed, grads in enumerate(step_grads):
            ref = _reference_grads(seed)
            for name, g in grads.items():
                assert torch.allclose(g, ref[name], atol=1e-6, rtol=0), (seed, name)
