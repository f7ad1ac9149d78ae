"""Apply a parallel layout to an already built plain model.

`parallelize(model, mesh, parallel_cfg)` returns a :class:`ParallelModel` that runs the model
on this rank's share of the layout. Today the layout is data-parallel (the mesh's dp group
averages gradients through :class:`~plait.parallel.data.GradientReducer`); tensor and pipeline
styles plug in here as they arrive, keyed by module names of the plain model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

import torch.nn as nn

from plait.config import ParallelConfig, TrainConfig
from plait.errors import PlanError
from plait.mesh import ParallelMesh
from plait.parallel.data import GradientReducer
from plait.train.optim import build_optimizer


class ParallelModel(nn.Module):
    """A plain model plus the communication that its mesh layout needs."""

    def __init__(self, module: nn.Module, mesh: ParallelMesh, reducer: GradientReducer | None):
        super().__init__()
        self.module = module
        self.mesh = mesh
        self.reducer = reducer

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (for all but the last micro-step)."""
        if self.reducer is None:
            yield
        else:
            with self.reducer.no_sync():
                yield

    def forward_backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                         ) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns their mean loss (detached).

        Gradients are those of the mean loss, reduced over the layout's groups when this returns.
        Strategies with their own schedule (pipelines) override this.
        """
        autocast = autocast or contextlib.nullcontext
        n = len(micro_batches)
        total = torch.zeros((), device=self.mesh.device)
        for i, (x, y) in enumerate(micro_batches):
            with (contextlib.nullcontext() if i == n - 1 else self.no_sync()):
                with autocast():
                    _, loss = self.module(x, y)
                (loss / n).backward()
            total += loss.detach().float()
        return total / n

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimizer for this rank's parameters (sharding strategies return their own)."""
        return build_optimizer(self.module, cfg, self.mesh.device)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Model and optimizer state in a layout-independent form, for a checkpoint.

        Collective: every rank calls it; the main rank gets {"model": ..., "optim": ...}, the
        others None. With plain data parallelism each rank already holds everything. Strategies
        that shard state gather it here, so a checkpoint loads under any other layout.
        """
        if not self.mesh.is_main:
            return None
        return {"model": self.module.state_dict(), "optim": optimizer.state_dict()}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`: every rank takes its share of the full state."""
        self.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to a global L2 norm over the whole model; returns the norm before clipping.

        With data parallelism every rank holds the full averaged gradient, so the local norm is
        the global one. Strategies that shard gradients override this to reduce over their groups.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm <= 0:
            if not params:
                return torch.zeros((), device=self.mesh.device)
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig | None = None) -> ParallelModel:
    """Wrap `model` for `mesh`; the model must already be on `mesh.device`."""
    cfg = cfg or ParallelConfig()
    if mesh.tp_size > 1 or mesh.pp_size > 1:
        raise PlanError(
            f"mesh has tp={mesh.tp_size}, pp={mesh.pp_size}; this version parallelizes over dp only"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise PlanError("the model has no trainable parameters; nothing to parallelize")
    reducer = None
    if mesh.dp_size > 1:
        reducer = GradientReducer(model, mesh.dp_group, bucket_mb=cfg.bucket_mb, mode=cfg.reducer)
    return ParallelModel(model, mesh, reducer)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, ParallelModel) else model
