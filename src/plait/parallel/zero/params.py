"""ZeRO-3 parameters: each block's are gathered just before use and released right after.

Forward: the root's parameters (embeddings, final norm, head) are gathered when the model starts
and stay until its backward has finished (the head is the first thing backward needs). Before
block i runs, its gather is awaited (or issued) and block i+1's is issued asynchronously, so
communication overlaps block i's compute; after block i, its parameters are released.

Backward: a hook on block i's output fires when its gradient is ready, i.e. just before block
i's backward; it gathers block i again (prefetched where possible) and issues block i-1's. Once
block i's gradients are all produced, :class:`~plait.parallel.zero.grads.ShardedGradients`
launches their reduce-scatter and calls :meth:`ParamGatherer.release` for it.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from plait.parallel.zero.flat import FlatUnit


class ParamGatherer:
    """Module hooks that keep only the units in use gathered."""

    def __init__(self, model: nn.Module, units: list[FlatUnit], group: "dist.ProcessGroup | None"):
        self.group = group
        self.blocks = [u for u in units if u.block is not None]
        self.root = next((u for u in units if u.block is None), None)
        self._handles = [model.register_forward_pre_hook(self._root_pre),
                         model.register_forward_hook(self._root_post)]
        for i, u in enumerate(self.blocks):
            self._handles.append(u.module.register_forward_pre_hook(functools.partial(self._pre_forward, i)))
            self._handles.append(u.module.register_forward_hook(functools.partial(self._post_forward, i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- gathering -------------------------------------------------------------------------

    def ensure(self, unit: FlatUnit) -> None:
        """Make `unit`'s parameters usable: wait for its prefetch, or gather now."""
        if unit.gather_work is not None:
            unit.gather_work.wait()
            unit.gather_work = None
        elif not unit.gathered:
            unit.gather(self.group)

    def prefetch(self, unit: FlatUnit) -> None:
        if unit.gather_work is None and not unit.gathered:
            unit.gather_work = unit.gather(self.group, async_op=True)

    def release(self, unit: FlatUnit) -> None:
        if unit.gather_work is not None:  # a prefetch nobody used (backward stopped early)
            unit.gather_work.wait()
            unit.gather_work = None
        unit.release()

    def release_all(self) -> None:
        for u in self.blocks + ([self.root] if self.root else []):
            self.release(u)

    # --- hooks -----------------------------------------------------------------------------

    def _root_pre(self, module, args) -> None:
        if self.root is not None:
            self.ensure(self.root)
        if self.blocks:
            self.prefetch(self.blocks[0])

    def _root_post(self, module, args, output) -> None:
        if not torch.is_grad_enabled():  # no backward follows (evaluation)
            self.release_all()

    def _pre_forward(self, i: int, module, args) -> None:
        self.ensure(self.blocks[i])
        if i + 1 < len(self.blocks):
            self.prefetch(self.blocks[i + 1])

    def _post_forward(self, i: int, module, args, output) -> None:
        self.release(self.blocks[i])
        if not torch.is_grad_enabled():
            return
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, functools.partial(self._pre_backward, i), mode="any")

    def _pre_backward(self, i: int, grad) -> None:
        self.ensure(self.blocks[i])
        if i > 0:
            self.prefetch(self.blocks[i - 1])
