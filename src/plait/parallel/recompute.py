"""Activation recomputation per block, applied from outside the model.

"full": each block of `model.blocks` runs under non-reentrant `torch.utils.checkpoint`: forward
keeps only the block's input, and backward re-runs the block to get its activations back.

"selective": the block is checkpointed with a selective policy (torch's
`create_selective_checkpoint_contexts`): the outputs of matrix multiplications are kept, and
everything between them is recomputed in backward: attention (SDPA), activation functions,
layer norms, residual adds and dropout. Those are cheap to recompute but their activations are a
large share of a block's memory. All random ops are recomputed (none is cached), and checkpoint
restores the RNG state before recomputing, so dropout masks repeat exactly.

The block's `forward` is replaced on the instance (module names, hooks and state dicts are
unchanged); :func:`remove_recompute` puts it back. Recomputation only applies when gradients
are being recorded; evaluation runs the plain forward.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from plait.errors import ConfigError
from plait.parallel.units import require_blocks

MODES = ("none", "full", "selective")
_ORIGINAL = "_plait_forward_before_recompute"

_aten = torch.ops.aten
# Ops whose outputs selective recomputation keeps: the matrix multiplications.
KEEP_OPS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
                      _aten.baddbmm.default, _aten.linear.default})


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _recomputed(forward: Callable, mode: str) -> Callable:
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context

    @functools.wraps(forward)
    def run(*args, **kw):
        if not torch.is_grad_enabled():
            return forward(*args, **kw)
        return checkpoint(forward, *args, **kw, **kwargs)

    return run


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward ("full" or "selective"); "none" does nothing."""
    if mode not in MODES:
        raise ConfigError(f"parallel.recompute={mode!r} is invalid; valid: {', '.join(MODES)}")
    if mode == "none":
        return
    for block in require_blocks(model, f"parallel.recompute={mode!r}"):
        if hasattr(block, _ORIGINAL):
            raise ConfigError("recomputation is already applied to this model")
        setattr(block, _ORIGINAL, block.forward)
        block.forward = _recomputed(block.forward, mode)


def remove_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_recompute`."""
    for block in require_blocks(model, "remove_recompute"):
        if hasattr(block, _ORIGINAL):
            del block.forward
            delattr(block, _ORIGINAL)
