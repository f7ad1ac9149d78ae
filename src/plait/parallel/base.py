"""ParallelModel: a plain model plus the communication its place on the mesh needs.

This is what :func:`plait.parallel.parallelize` returns and what the trainer talks to. Its
methods are the extension points strategies override: `forward_backward`, `clip_grad_norm_`
(through `grad_pieces`), `build_optimizer`, `checkpoint_state` / `load_checkpoint_state`,
`eval_loss`, `step_metrics`. The base class covers data parallelism (a gradient reducer over the
dp group) and, when the model was split over tp first, tensor parallelism (a
:class:`~plait.parallel.tensor_parallel.split.TensorParallel`): ZeRO and pipelines reuse both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from plait.config import TrainConfig
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.grad_norm import GradPiece, clip_grad_norm_
from plait.parallel.tensor_parallel.split import TensorParallel
from plait.optim import build_optimizer

Autocast = Callable[[], contextlib.AbstractContextManager]


class ParallelModel(nn.Module):
    """A plain model plus the communication that its mesh layout needs."""

    def __init__(self, module: nn.Module, mesh: ParallelMesh, reducer: GradientReducer | None = None,
                 tensor: TensorParallel | None = None):
        super().__init__()
        self.module = module
        self.mesh = mesh
        self.reducer = reducer
        self.tensor = tensor  # the tp split, when tp > 1
        self.steps_done = 0  # seeds the tp dropout stream; restored from checkpoints

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

    # --- training step --------------------------------------------------------------------

    def forward_backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Autocast | None = None) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns their mean loss (detached).

        Gradients are those of the mean loss, reduced over the layout's groups when this returns.
        Strategies with their own schedule (pipelines) override this.
        """
        autocast = autocast or contextlib.nullcontext
        if self.tensor is not None:
            self.tensor.reseed(self.steps_done)
        n = len(micro_batches)
        total = torch.zeros((), device=self.mesh.device)
        for i, (x, y) in enumerate(micro_batches):
            with (contextlib.nullcontext() if i == n - 1 else self.no_sync()):
                with autocast():
                    _, loss = self.module(x, y)
                (loss / n).backward()
            total += loss.detach().float()
        if self.tensor is not None:
            self.finish_partial_grads()
        self.steps_done += 1
        return total / n

    def finish_partial_grads(self) -> None:
        """Sequence parallelism: sum partial gradients over tp (where the gradients live)."""
        self.tensor.sum_partial_grads(list(self.module.parameters()))

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, autocast: Autocast | None = None) -> torch.Tensor:
        """Loss of one held-out batch, on every rank (pipelines run it through their stages)."""
        with (autocast or contextlib.nullcontext)():
            return self.module(x, y)[1]

    def step_metrics(self) -> dict[str, Any]:
        """Strategy-specific figures about the last step for the trainer's metrics (e.g. bubble)."""
        return {}

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimizer for this rank's parameters (sharding strategies return their own)."""
        return build_optimizer(self.module, cfg, self.mesh.device)

    # --- clipping -------------------------------------------------------------------------

    def grad_pieces(self) -> list[GradPiece]:
        """This rank's gradients and the mesh dimensions each is a disjoint part of the whole over.

        Here: tp shards are split over "tp"; everything else is replicated (dp-averaged).
        Pipelines add "pp" (each stage holds its own layers); ZeRO lists its dp shards instead.
        """
        sharded = self.tensor.is_sharded if self.tensor is not None else (lambda p: False)
        return [GradPiece(p.grad, ("tp",) if sharded(p) else ())
                for p in self.module.parameters() if p.grad is not None]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to a global L2 norm over the whole model; returns the norm before clipping.

        One implementation for every layout (:func:`plait.parallel.grad_norm.clip_grad_norm_`),
        driven by which groups each gradient is sharded over (:meth:`grad_pieces`).
        """
        return clip_grad_norm_(self.grad_pieces(), max_norm, self.mesh)

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Model and optimizer state in a layout-independent form, for a checkpoint.

        Collective: every rank calls it; the main rank gets {"model": ..., "optim": ...}, the
        others None. With plain data parallelism each rank already holds everything; tp shards are
        gathered by the first tp group. Strategies that shard more gather it here too, so a
        checkpoint loads under any other layout.
        """
        return self._full_state(self.module.state_dict(), _optimizer_params(optimizer.param_groups),
                                optimizer.state_dict())

    def _full_state(self, model: dict[str, Any], params: list[nn.Parameter], optim: dict[str, Any]
                    ) -> dict[str, Any] | None:
        """Gather tp shards of a (dp-complete) model and optimizer state; the main rank's result."""
        if self.tensor is not None:
            if self.mesh.dp_rank != 0 or self.mesh.pp_rank != 0:
                return None  # every tp group holds the same values; the main rank's one gathers
            model = self.tensor.full_model_state(self.module, model)
            optim = self.tensor.full_optimizer_state(params, optim)
        if not self.mesh.is_main:
            return None
        return {"model": model, "optim": optim}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`: every rank takes its share of the full state."""
        model, optim = self._local_state(_optimizer_params(optimizer.param_groups), state)
        self.module.load_state_dict(model)
        optimizer.load_state_dict(optim)

    def _local_state(self, params: list[nn.Parameter], state: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's tp slices of a full checkpoint (model, optimizer); restores the step."""
        step = state.get("state", {}).get("step")
        if step is not None:
            self.steps_done = int(step)
        if self.tensor is None:
            return state["model"], state["optim"]
        return (self.tensor.local_model_state(self.module, state["model"]),
                self.tensor.local_optimizer_state(params, state["optim"]))

    # --- per-rank compression state -------------------------------------------------------

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


def _optimizer_params(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    """Parameters in the numbering of optimizer.state_dict() (torch numbers them group by group)."""
    return [p for group in groups for p in group["params"]]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a ParallelModel (or the model itself)."""
    return model.module if isinstance(model, ParallelModel) else model

