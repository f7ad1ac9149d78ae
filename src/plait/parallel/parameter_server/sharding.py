"""The flat parameter vector of a model and its split into server shards balanced by size.

Trainable parameters are laid end to end in `named_parameters()` order (tied weights once).
Server s owns the contiguous range [bounds[s], bounds[s+1]) of that vector; the ranges differ
in size by at most one element, whatever the tensor sizes. A tensor may straddle two servers:
the optimizers are elementwise, so where a tensor is cut changes no arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from plait.errors import PlanError


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Piece:
    """The part [start, stop) (flat offsets) of one parameter that lies in a server's shard."""

    slot: ParamSlot
    start: int
    stop: int


@dataclass(frozen=True)
class FlatLayout:
    """Where each trainable parameter lives in the flat vector."""

    slots: tuple[ParamSlot, ...]
    numel: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> "FlatLayout":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise PlanError(f"{type(model).__name__} has no trainable parameters; the parameter "
                            "server has nothing to serve")
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) > 1:
            raise PlanError(f"{type(model).__name__} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                            "the parameter server needs one dtype (convert the model first)")
        slots, offset = [], 0
        for name, p in params:
            slots.append(ParamSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        return cls(tuple(slots), offset, params[0][1].dtype)

    def shard_bounds(self, n_servers: int) -> list[tuple[int, int]]:
        """[start, stop) of each server's shard: contiguous, sizes within one element."""
        if self.numel < n_servers:
            raise PlanError(f"the model has {self.numel} trainable elements, fewer than "
                            f"parallel.ps.servers={n_servers}; use fewer servers")
        cuts = [self.numel * s // n_servers for s in range(n_servers + 1)]
        return [(cuts[s], cuts[s + 1]) for s in range(n_servers)]

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """The parts of parameters inside [start, stop), in order."""
        out = []
        for slot in self.slots:
            lo, hi = max(start, slot.offset), min(stop, slot.offset + slot.numel)
            if lo < hi:
                out.append(Piece(slot, lo, hi))
        return out

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[s.name] for s in self.slots]

    def read_params(self, model: nn.Module) -> torch.Tensor:
        """A new flat copy of the model's trainable parameters."""
        return torch.cat([p.detach().reshape(-1) for p in self.trainable(model)])

    def bind_params(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Make the parameters views of `flat` (initialised from them), so writing `flat` updates
        the model without a copy."""
        with torch.no_grad():
            for slot, p in zip(self.slots, self.trainable(model)):
                view = flat[slot.offset:slot.offset + slot.numel].view(slot.shape)
                view.copy_(p)
                p.data = view

    def gather_grads(self, model: nn.Module, out: torch.Tensor) -> None:
        """Copy every gradient into `out` (zeros where a parameter got none)."""
        for slot, p in zip(self.slots, self.trainable(model)):
            view = out[slot.offset:slot.offset + slot.numel]
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
