"""Activation recomputation: identical gradients (also under tensor parallelism, dropout included),
less activation memory."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError, PlanError
from plait.models import GPT
from plait.parallel.memory.recompute import apply_recompute, remove_recompute
from plait.testing.memory import track_allocations
from tests.helpers import max_abs_diff, tiny_model_config


def _grads(mode: str, dropout: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(tiny_model_config(dropout=dropout, n_layer=3))
    apply_recompute(model, mode)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (4, 17), generator=g)
    torch.manual_seed(2)  # the dropout stream
    model(data[:, :-1], data[:, 1:])[1].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_gives_identical_gradients(mode, dropout):
    # Bit-identical: the same kernels re-run on the same inputs, dropout masks replayed from the
    # RNG state checkpoint saved.
    assert max_abs_diff(_grads(mode, dropout), _grads("none", dropout)) == 0.0


def _activation_bytes(mode: str) -> int:
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=4, n_embd=64, n_head=4, block_size=64))
    apply_recompute(model, mode)
    x = torch.randint(0, 256, (8, 64))
    with track_allocations() as trace:
        _, loss = model(x, x)  # what forward leaves alive for backward
    loss.backward()
    return trace.net


def test_recompute_holds_less_activation_memory():
    none, selective, full = (_activation_bytes(m) for m in ("none", "selective", "full"))
    assert full < selective < none
    assert full < 0.35 * none  # only block inputs (and the head's activations) stay


def test_recompute_skipped_in_evaluation_and_removable():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    x = torch.randint(0, 256, (2, 16))
    ref = model(x)
    apply_recompute(model, "full")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(ConfigError, match="already applied"):
        apply_recompute(model, "selective")
    remove_recompute(model)
    apply_recompute(model, "selective")  # possible again once removed


def test_bad_recompute_settings():
    with pytest.raises(ConfigError, match=r"parallel.recompute='some' is invalid; valid: none, full, selective"):
        apply_recompute(GPT(tiny_model_config()), "some")
    with pytest.raises(PlanError, match="model.blocks"):
        apply_recompute(torch.nn.Linear(2, 2), "full")


def _tp_grads(mode: str, sp: bool) -> dict[str, torch.Tensor]:
    """tp=2 (dropout on, so the replicated-dropout stream matters), two micro-batches: this rank's
    gradient shards."""
    from plait.config import ParallelConfig
    from plait.mesh import ParallelMesh
    from plait.parallel import parallelize
    mesh = ParallelMesh.build(tp=2)
    torch.manual_seed(0)
    model = GPT(tiny_model_config(dropout=0.2, n_layer=2, n_head=4))
    pm = parallelize(model, mesh, ParallelConfig(tp=2, sequence_parallel=sp, recompute=mode))
    data = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    pm.forward_backward([(data[:2, :-1], data[:2, 1:]), (data[2:, :-1], data[2:, 1:])])
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_recompute_with_tensor_parallelism_gives_identical_gradients(pools, mode, sp):
    """Recomputation replays the tp group's shared dropout stream, and the next micro-batch draws
    the masks it would have drawn without recomputation: gradients equal bit for bit."""
    with_recompute = pools(2).run(_tp_grads, mode, sp)
    without = pools(2).run(_tp_grads, "none", sp)
    for a, b in zip(with_recompute, without):
        assert max_abs_diff(a, b) == 0.0


def _own_generator_run(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    from plait.parallel.tensor_parallel.layers import ReplicatedDropout
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), ReplicatedDropout(0.5, gen))])
    apply_recompute(model, mode)
    x = torch.randn(3, 8, requires_grad=True)
    model.blocks[0](x).sum().backward()  # with recompute: the block re-runs, replaying the draw
    next_mask = torch.empty(16).bernoulli_(0.5, generator=gen)  # the stream goes on from here
    return x.grad, next_mask


def test_recomputation_replays_and_restores_a_module_generator():
    grad_r, next_r = _own_generator_run("full")
    grad, nxt = _own_generator_run("none")
    assert torch.equal(grad_r, grad)  # the recomputed mask is the one forward drew
    assert torch.equal(next_r, nxt)  # and the stream continues as if nothing was recomputed
