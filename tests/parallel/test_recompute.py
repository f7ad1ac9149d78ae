"""Activation recomputation: identical gradients, less activation memory, composes with ZeRO-3."""

from __future__ import annotations

import pytest
import torch

from plait.errors import ConfigError, PlanError
from plait.models import GPT
from plait.parallel.recompute import apply_recompute, remove_recompute
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
