"""Apply a parallel layout to an already built plain model.

`parallelize(model, mesh, parallel_cfg)` returns a :class:`ParallelModel` that runs the model
on this rank's share of the layout: gradients averaged over the mesh's dp group
(:class:`~plait.parallel.data.GradientReducer`, or ZeRO sharding), tensor-parallel styles applied
by module name (`GPT.plan()`), and pipeline stages cut from the model's layers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

import torch.nn as nn

from plait.config import ParallelConfig, TrainConfig, validate_memory_comm
from plait.errors import PlanError
from plait.mesh import ParallelMesh
from plait.parallel.comm_hooks import build_comm_hook
from plait.parallel.data import GradientReducer
from plait.parallel.recompute import apply_recompute
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

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
        """Loss of one held-out batch, on every rank (pipelines run it through their stages)."""
        with (autocast or contextlib.nullcontext)():
            return self.module(x, y)[1]

    def step_metrics(self) -> dict[str, Any]:
        """Strategy-specific figures about the last step for the trainer's metrics (e.g. bubble)."""
        return {}

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

    @property
    def _comm_hook(self) -> Any:
        return self.reducer.comm_hook if self.reducer is not None else None

    @property
    def keeps_comm_state(self) -> bool:
        """Whether the reducer's hook keeps per-rank state (PowerSGD, top-k) that checkpoints carry."""
        return hasattr(self._comm_hook, "state_dict")

    def comm_state(self) -> dict[str, Any] | None:
        """This rank's gradient-compression state (error feedback, warm start, warm-up count),
        or None when the reducer's hook keeps none. It is per rank, so it only fits a run of the
        same layout; checkpoints carry one per rank."""
        return self._comm_hook.state_dict() if self.keeps_comm_state else None

    def load_comm_state(self, state: dict[str, Any]) -> bool:
        """Restore :meth:`comm_state`; returns False (loading nothing) if `state` does not fit
        this rank's hook and buckets, e.g. after a change of compression or bucket size."""
        if (not self.keeps_comm_state or not isinstance(state, dict)
                or not self._comm_hook.fits(state, self.reducer.buckets)):
            return False
        self._comm_hook.load_state_dict(state)
        return True

    def reset_comm_state(self) -> None:
        """Start the compression state afresh, warm-up included (as a new run does)."""
        if self.keeps_comm_state:
            self._comm_hook.reset()

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


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig | None = None,
                plan: Any = None) -> ParallelModel:
    """Wrap `model` for `mesh`; the model must already be on `mesh.device`.

    With tp > 1 the model is split in place by `plan` (default: `type(model).plan()`, e.g.
    `GPT.plan()`), a mapping of module-name patterns to tensor-parallel styles; see
    plait.parallel.tensor_plan.
    """
    cfg = cfg or ParallelConfig()
    validate_memory_comm(cfg, dp=mesh.dp_size)
    if not any(p.requires_grad for p in model.parameters()):
        raise PlanError("the model has no trainable parameters; nothing to parallelize")
    if mesh.pp_size > 1:  # pipeline stages; with tp > 1 the stages hold tensor-parallel shards
        from plait.parallel.pipeline.model import PipelineParallelModel
        return PipelineParallelModel(model, mesh, cfg, plan=plan)
    if mesh.tp_size > 1:
        if cfg.zero > 0:  # ZeRO over dp on each tp shard
            from plait.parallel.zero_tensor import parallelize_zero_tensor
            return parallelize_zero_tensor(model, mesh, cfg, plan)
        from plait.parallel.tensor_model import parallelize_tensor
        return parallelize_tensor(model, mesh, cfg, plan)
    apply_recompute(model, cfg.recompute)
    hook = build_comm_hook(cfg, mesh, model)  # compression or hierarchical all-reduce, else None
    if cfg.zero > 0:
        from plait.parallel.zero import ZeroModel  # zero.py builds on ParallelModel
        return ZeroModel(model, mesh, cfg.zero, offload=cfg.offload_optimizer,
                         bucket_mb=cfg.bucket_mb, comm_hook=hook, reducer_mode=cfg.reducer)
    reducer = None
    if mesh.dp_size > 1:
        reducer = GradientReducer(model, mesh.dp_group, bucket_mb=cfg.bucket_mb, mode=cfg.reducer,
                                  comm_hook=hook)
    return ParallelModel(model, mesh, reducer)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, ParallelModel) else model
