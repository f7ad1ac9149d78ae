"""ZeRO-2/3 gradients: reduce-scattered per unit as soon as backward has produced them.

A post-accumulate-grad hook moves each parameter's gradient into its unit's flat buffer and drops
`.grad` at once, so full gradients never pile up: at most two units' flat gradients are alive at
a time (the one being filled and the one being reduced). Units launch in backward order (last
block first, the root last), strictly in that order, so every rank issues the same collectives
in the same sequence. At the end of backward the units not yet launched go out (a parameter
without a gradient contributes zeros), one small all-reduce sums the used-flags, and each rank
adds the average of its slice to the unit's `grads.shard`, which accumulates over micro-steps
until `zero_grad`. A parameter no rank produced a gradient for gets none, as in plain DP.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.parallel.collectives import reduce_scatter_flat
from plait.parallel.zero.flat import FlatUnit


class ShardedGradients:
    """Reduce-scatters the gradients of `units` over `group` during backward."""

    def __init__(self, units: list[FlatUnit], group: "dist.ProcessGroup | None", world: int,
                 on_launched: Callable[[FlatUnit], None] | None = None,
                 after_backward: Callable[[], None] | None = None):
        self.units = units
        self.group = group
        self.world = world
        self.on_launched = on_launched
        self.after_backward = after_backward
        blocks = [u for u in units if u.block is not None]
        self.order = blocks[::-1] + [u for u in units if u.block is None]
        self._queued = False
        self._inflight: list[FlatUnit] = []
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, u, slot))
                         for u in units for slot, p in enumerate(u.params)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def zero_grad(self) -> None:
        """Drop the reduced shards (the optimizer's zero_grad calls this)."""
        for u in self.units:
            u.grads.shard = None
            u.grads.used = [False] * len(u.params)

    # --- backward-time machinery -----------------------------------------------------------

    def _on_grad(self, unit: FlatUnit, slot: int, p: nn.Parameter) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        g = unit.grads
        if g.full is None:
            g.full = torch.empty(unit.padded, dtype=p.dtype, device=p.device)
        view = unit.param_flat(slot, g.full)
        if slot in g.ready:  # a second gradient for the same parameter in one backward
            view.add_(p.grad)
        else:
            view.copy_(p.grad)
        p.grad = None
        g.ready.add(slot)
        g.used_here[slot] = True
        for u in self.order:
            if u.grads.launched:
                continue
            if len(u.grads.ready) < len(u.params):
                break
            self._launch(u)

    def _launch(self, unit: FlatUnit) -> None:
        g = unit.grads
        if g.full is None:
            g.full = torch.zeros(unit.padded, dtype=unit.full.dtype, device=unit.full.device)
        else:  # zeros where no gradient arrived: unused parameters and the padding
            for slot in range(len(unit.params)):
                if slot not in g.ready:
                    unit.param_flat(slot, g.full).zero_()
            g.full[unit.numel:].zero_()
        g.out = torch.empty(unit.shard_numel, dtype=g.full.dtype, device=g.full.device)
        g.work = reduce_scatter_flat(g.out, g.full, self.group, self.world, async_op=True)
        g.launched = True
        if self.on_launched is not None:
            self.on_launched(unit)
        # Bound memory: one reduction in flight; it overlaps the next block's backward.
        self._inflight.append(unit)
        while len(self._inflight) > 1:
            self._land(self._inflight.pop(0))

    def _land(self, unit: FlatUnit) -> None:
        g = unit.grads
        if g.work is not None:
            g.work.wait()
            g.work = None
        g.out.div_(self.world)
        if g.shard is None:
            g.shard = g.out
        else:
            g.shard.add_(g.out)
        g.out = None
        g.full = None

    def _finish(self) -> None:
        self._queued = False
        for u in self.order:
            if not u.grads.launched:
                self._launch(u)
        flags = torch.tensor([float(f) for u in self.order for f in u.grads.used_here],
                             device=self.order[0].full.device)
        if self.world > 1:
            dist.all_reduce(flags, group=self.group)  # one tiny collective per backward
        while self._inflight:
            self._land(self._inflight.pop(0))
        used = flags.tolist()
        i = 0
        for u in self.order:
            g = u.grads
            for slot in range(len(u.params)):
                g.used[slot] = g.used[slot] or used[i] > 0
                i += 1
            g.ready.clear()
            g.used_here = [False] * len(u.params)
            g.launched = False
        if self.after_backward is not None:
            self.after_backward()
