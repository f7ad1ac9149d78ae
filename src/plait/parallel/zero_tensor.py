"""ZeRO over dp combined with tensor parallelism over tp.

The model is first split over the tp group by the tensor-parallel plan
(:func:`~plait.parallel.tensor_model.parallelize_tensor`); ZeRO then shards each rank's tp-local
parameters over its dp group, so every tp rank runs its own ZeRO over the ranks that hold the
same tp shard. The tensor-parallel model keeps its jobs: the step's dropout seeding, summing
sequence-parallel partial gradients over tp, and the tp side of clipping and checkpoints. ZeRO
adds the dp side: sharded optimizer state (stage 1), gradients (2) and parameters (3).

Checkpoints compose the two gathers: ZeRO gathers the dp shards into the plain tp-local state,
and the tensor-parallel model gathers that over tp into the plain full model's state, which
loads under any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from plait.config import ParallelConfig
from plait.mesh import ParallelMesh
from plait.parallel.tensor_model import TensorParallelModel, parallelize_tensor
from plait.parallel.tensor_shard import has_partial_grad, shard_spec
from plait.parallel.zero import ZeroModel
from plait.parallel.zero_optim import ShardedAdamW


class _PlainOptimizerView:
    """What the tensor-parallel checkpoint code reads of an optimizer, for a ShardedAdamW: the
    plain parameter groups of the tp-local model and their dp-gathered, plain-form state."""

    def __init__(self, optimizer: ShardedAdamW, state: dict[str, Any] | None = None):
        self._optimizer = optimizer
        self._state = state
        self.param_groups = optimizer.full_groups

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer.load_full_state_dict(state)


class ZeroTensorParallelModel(ZeroModel):
    """ZeRO stage 1-3 over dp on top of a :class:`TensorParallelModel` over tp."""

    def __init__(self, tp_model: TensorParallelModel, stage: int, offload: bool = False):
        reducer = tp_model.reducer if stage == 1 else None
        if stage > 1 and tp_model.reducer is not None:
            tp_model.reducer.remove()  # stages 2/3 reduce-scatter instead
            tp_model.reducer = None
        super().__init__(tp_model.module, tp_model.mesh, stage, offload=offload, reducer=reducer)
        self.__dict__["tp"] = tp_model  # not a submodule: it wraps the same module

    def forward_backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                         ) -> torch.Tensor:
        loss = self.tp.forward_backward(micro_batches, autocast)  # sums partial .grad (stage 1)
        if self.stage > 1:
            self._sum_partial_shards()
        return loss

    def _sum_partial_shards(self) -> None:
        """Sequence parallelism: finish partial gradients over tp, on the reduced dp shards."""
        parts = [u.grads.shard[pc.shard_lo:pc.shard_hi] for u in self.units if u.grads.shard is not None
                 for pc in u.pieces() if has_partial_grad(u.params[pc.slot])]
        if not parts:
            return
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.mesh.tp_group)
        at = 0
        for t in parts:
            t.copy_(flat[at:at + t.numel()])
            at += t.numel()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Norm of the whole model: tp-sharded squares summed over tp, all summed over dp."""
        if self.stage == 1:
            return self.tp.clip_grad_norm_(max_norm)
        sq = torch.zeros(2, dtype=torch.float32, device=self.mesh.device)  # [tp-sharded, replicated]
        for u in self.units:
            if u.grads.shard is None:
                continue
            for pc in u.pieces():
                g = u.grads.shard[pc.shard_lo:pc.shard_hi]
                sq[0 if shard_spec(u.params[pc.slot]) is not None else 1] += g.float().pow(2).sum()
        if self.world > 1:
            dist.all_reduce(sq, group=self.dp_group)
        dist.all_reduce(sq[:1], group=self.mesh.tp_group)
        norm = sq.sum().sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for u in self.units:
                if u.grads.shard is not None:
                    u.grads.shard.mul_(coef.to(u.grads.shard.dtype))
        return norm

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        opt = self._sharded(optimizer)
        with self.gathered():
            plain = opt.full_state_dict()  # over dp: on each dp group's first rank
            state = self.tp.checkpoint_state(_PlainOptimizerView(opt, plain))  # over tp
            if state is not None:  # copy out of the gathered storage before it is released
                state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
        return state

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt = self._sharded(optimizer)
        with self.gathered(writeback=True):
            self.tp.load_checkpoint_state(_PlainOptimizerView(opt), state)


def parallelize_zero_tensor(model: torch.nn.Module, mesh: ParallelMesh, cfg: ParallelConfig,
                            plan: Any = None) -> ZeroTensorParallelModel:
    """Split `model` over tp by `plan`, then apply ZeRO stage `cfg.zero` over dp."""
    plain = dataclasses.replace(cfg, zero=0, offload_optimizer=False)
    tp_model = parallelize_tensor(model, mesh, plain, plan)
    return ZeroTensorParallelModel(tp_model, cfg.zero, offload=cfg.offload_optimizer)
