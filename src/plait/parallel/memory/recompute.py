"""Activation recomputation per block, applied from outside the model.

"full": each block of `model.blocks` runs under non-reentrant `torch.utils.checkpoint`: forward
keeps only the block's input, and backward re-runs the block to get its activations back.

"selective": the block is checkpointed with a selective policy (torch's
`create_selective_checkpoint_contexts`): the outputs of matrix multiplications are kept, and
everything between them is recomputed in backward: attention (SDPA), activation functions,
layer norms, residual adds and dropout. Those are cheap to recompute but their activations are a
large share of a block's memory. All random ops are recomputed (none is cached), and checkpoint
restores the RNG state before recomputing, so dropout masks repeat exactly.

Checkpoint restores only torch's default generators. Modules that draw from a generator of their
own (tensor parallelism's replicated dropout, whose masks must agree across a tp group) expose it
as `generator`; the recomputation replays that stream too, from the state it had when the block
ran forward, and leaves it afterwards where it was, so later forwards (the next micro-batch)
draw the same masks as without recomputation.

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
from plait.parallel.blocks import require_blocks

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


def own_generators(block: nn.Module) -> list[torch.Generator]:
    """The generators that modules of `block` draw from besides torch's default ones."""
    found: dict[int, torch.Generator] = {}
    for m in block.modules():
        g = getattr(m, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def _replaying(forward: Callable, generators: list[torch.Generator]) -> Callable:
    """`forward` for checkpoint: the first call runs as is; a recomputation replays the first
    call's draws from `generators`, then puts them back where they were."""
    if not generators:
        return forward
    at_forward = [g.get_state() for g in generators]
    calls = 0

    def run(*args, **kw):
        nonlocal calls
        calls += 1
        if calls == 1:
            return forward(*args, **kw)
        now = [g.get_state() for g in generators]
        for g, state in zip(generators, at_forward):
            g.set_state(state)
        try:
            return forward(*args, **kw)
        finally:  # also when checkpoint stops the recomputation early
            for g, state in zip(generators, now):
                g.set_state(state)

    return run


def _recomputed(forward: Callable, mode: str, generators: list[torch.Generator]) -> Callable:
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context

    @functools.wraps(forward)
    def run(*args, **kw):
        if not torch.is_grad_enabled():
            return forward(*args, **kw)
        return checkpoint(_replaying(forward, generators), *args, **kw, **kwargs)

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
        block.forward = _recomputed(block.forward, mode, own_generators(block))


def remove_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_recompute`."""
    for block in require_blocks(model, "remove_recompute"):
        if hasattr(block, _ORIGINAL):
            del block.forward
            delattr(block, _ORIGINAL)
