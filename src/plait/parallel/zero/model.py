"""ZeRO stages 1-3 (Rajbhandari et al., 2020) over the data-parallel group.

Stage 1 shards the optimizer state: gradients are all-reduced as in plain data parallelism (by
the bucketed :class:`~plait.parallel.data_parallel.reducer.GradientReducer`, so compression hooks still apply),
each rank updates only its 1/dp shard of the parameters, and the shards are all-gathered back.
Stage 2 also shards the gradients: they are reduce-scattered per block during backward and each
rank keeps only its shard (:mod:`plait.parallel.zero.grads`). Stage 3 also shards the parameters:
each block is gathered just before use and released after, in forward and again in backward
(:mod:`plait.parallel.zero.params`).

Parameters are grouped per block of `model.blocks` plus one root group for the rest, each group
in one flat buffer split evenly over dp (:mod:`plait.parallel.zero.flat`). Frozen parameters are not
sharded. ZeRO shards over the dp group only: with tensor parallelism each tp rank shards its own
tp-local parameters over its dp group.

Gradient accumulation: stage 1 skips communication on micro-steps (`no_sync`); stages 2 and 3
reduce-scatter every micro-step and accumulate into the shard, which keeps memory at the
sharded size.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import TrainConfig
from plait.errors import PlanError
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.reducer import CommHook, GradientReducer
from plait.parallel.zero.flat import FlatUnit, Piece
from plait.parallel.blocks import group_by_block
from plait.parallel.zero.grads import ShardedGradients
from plait.parallel.zero.optim import ShardedAdamW
from plait.parallel.zero.params import ParamGatherer
from plait.parallel.base import ParallelModel
from plait.parallel.collectives import broadcast_from_first
from plait.parallel.grad_norm import GradPiece
from plait.parallel.tensor_parallel.shard import has_partial_grad
from plait.parallel.tensor_parallel.split import TensorParallel

log = logging.getLogger(__name__)


class ZeroModel(ParallelModel):
    """A plain model with ZeRO stage 1, 2 or 3 over the mesh's dp group."""

    def __init__(self, module: nn.Module, mesh: ParallelMesh, stage: int, offload: bool = False,
                 bucket_mb: float = 25.0, comm_hook: CommHook | None = None,
                 reducer_mode: str = "bucketed", tensor: TensorParallel | None = None):
        """Stage 1 all-reduces with a reducer (`reducer_mode`, `bucket_mb`, `comm_hook`); stages 2
        and 3 reduce-scatter per block and ignore these. With `tensor` (the model was split over
        tp first), each tp rank shards its own tp-local parameters over its dp group."""
        if stage not in (1, 2, 3):
            raise PlanError(f"parallel.zero={stage}: ZeroModel takes stage 1, 2 or 3")
        world = mesh.dp_size
        if world > 1:
            broadcast_from_first(module, mesh.dp_group)
        groups = group_by_block(module)
        if not groups:
            raise PlanError("the model has no trainable parameters; nothing to shard")
        units = [FlatUnit(i, g, mesh.dp_rank, world, keep_full=stage < 3) for i, g in enumerate(groups)]
        reducer = None
        if stage == 1 and world > 1:
            reducer = GradientReducer(module, mesh.dp_group, bucket_mb=bucket_mb, mode=reducer_mode,
                                      comm_hook=comm_hook, broadcast_params=False)
        super().__init__(module, mesh, reducer, tensor=tensor)
        self.stage = stage
        self.offload = offload
        self.dp_group = mesh.dp_group
        self.world = world
        self.units = units
        self.gatherer = ParamGatherer(module, units, self.dp_group) if stage == 3 else None
        self.grads = None
        if stage >= 2:
            self.grads = ShardedGradients(
                units, self.dp_group, world,
                on_launched=self.gatherer.release if self.gatherer else None,
                after_backward=self.gatherer.release_all if self.gatherer else None)
        self._optimizer: ShardedAdamW | None = None
        self._references_only = False
        if stage == 3:
            module.register_state_dict_pre_hook(self._refuse_released_state_dict)
        log.debug("ZeRO-%d over dp=%d: %d units, %d parameters per rank of %d", stage, self.world,
                  len(self.units), sum(u.shard_numel for u in self.units),
                  sum(u.numel for u in self.units))

    # --- ParallelModel extension points --------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Stage 1: skip the all-reduce on micro-steps. Stages 2/3 always reduce-scatter."""
        if self.stage == 1:
            with super().no_sync():
                yield
        else:
            yield

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """AdamW over this rank's shard (on the CPU with offload); one per model."""
        if self._optimizer is not None:
            raise PlanError("a ZeroModel has one optimizer; build_optimizer was already called")
        self._optimizer = ShardedAdamW(self.module, self.units, self, cfg, self.dp_group,
                                       offload=self.offload)
        return self._optimizer

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Gather the full model and the plain-AdamW-form optimizer state onto the main rank.

        Without tp, stage 3's parameters arrive as CPU copies gathered one block at a time. With
        tp, ZeRO first gathers the dp shards into the tp-local state, then the tp split gathers
        that into the plain model's."""
        opt = self._sharded(optimizer)
        if self.tensor is None:
            model = self._full_model_state()
            optim = opt.full_state_dict()
            return {"model": model, "optim": optim} if self.mesh.is_main else None
        with self.gathered():
            optim = opt.full_state_dict()  # over dp: on each dp group's first rank
            model = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if self.mesh.dp_rank != 0:
            return None
        return self._full_state(model, _params(opt.full_groups), optim)

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The plain model's state dict, on the main rank. Stage 3 gathers one unit at a time and
        copies it to the CPU, so no rank holds the whole model on its device."""
        main = self.mesh.is_main
        if self.stage < 3:
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()} if main else None
        copies: dict[int, torch.Tensor] = {}
        for u in self.units:
            self.gatherer.ensure(u)  # collective over dp
            if main:
                copies.update((id(p), p.detach().to("cpu", copy=True)) for p in u.params)
            self.gatherer.release(u)
        if not main:
            return None
        self._references_only = True  # keep_vars: references, no released storage is read
        try:
            refs = self.module.state_dict(keep_vars=True)
        finally:
            self._references_only = False
        return {k: copies[id(v)] if id(v) in copies else v.detach().clone() for k, v in refs.items()}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Every rank loads the full state (its tp slices of it) and keeps its shards."""
        opt = self._sharded(optimizer)
        model, optim = self._local_state(_params(opt.full_groups), state)
        with self.gathered(writeback=True):
            self.module.load_state_dict(model)
        opt.load_full_state_dict(optim)

    def grad_pieces(self) -> list[GradPiece]:
        """Stage 1: the full (dp-averaged) gradients, as plain data parallelism. Stages 2/3: this
        rank's gradient shard of each parameter, split over "dp" (and "tp" for tp shards)."""
        if self.stage == 1:
            return super().grad_pieces()
        sharded = self.tensor.is_sharded if self.tensor is not None else (lambda p: False)
        return [GradPiece(u.grads.shard[pc.shard_lo:pc.shard_hi],
                          ("dp", "tp") if sharded(u.params[pc.slot]) else ("dp",))
                for u in self.units if u.grads.shard is not None for pc in u.pieces()]

    def finish_partial_grads(self) -> None:
        """Sequence parallelism: partial gradients summed over tp where they live after the
        dp reduction: in `.grad` (stage 1) or in this rank's gradient shards (stages 2/3)."""
        if self.stage == 1:
            return super().finish_partial_grads()
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

    # --- GradSource for ShardedAdamW -----------------------------------------------------------

    def piece_grad(self, piece: Piece) -> torch.Tensor | None:
        u = self.units[piece.unit]
        if self.stage == 1:
            g = u.params[piece.slot].grad
            return None if g is None else g.reshape(-1)[piece.param_lo:piece.param_hi]
        if u.grads.shard is None or not u.grads.used[piece.slot]:
            return None
        return u.grads.shard[piece.shard_lo:piece.shard_hi]

    def after_step(self) -> None:
        """Stages 1/2: all-gather the updated shards so every rank has the full parameters."""
        if self.stage == 3 or self.world == 1:
            return
        works = [u.gather(self.dp_group, async_op=True) for u in self.units]
        for w in works:
            if w is not None:
                w.wait()

    def zero_grad(self) -> None:
        if self.stage == 1:
            for u in self.units:
                for p in u.params:
                    p.grad = None
        else:
            self.grads.zero_grad()

    # --- full parameters ------------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered(self, writeback: bool = False) -> Iterator[None]:
        """Collective: all parameters present inside (ZeRO-3 gathers every unit; memory: full model).

        With `writeback`, changes made inside are copied back into this rank's shards.
        """
        if self.stage < 3:
            yield
            return
        for u in self.units:
            self.gatherer.ensure(u)
        try:
            yield
            if writeback:
                with torch.no_grad():
                    for u in self.units:
                        u.shard.copy_(u.full[u.lo:u.lo + u.shard_numel])
        finally:
            self.gatherer.release_all()

    def _refuse_released_state_dict(self, module, prefix, keep_vars) -> None:
        if not self._references_only and not all(u.gathered for u in self.units):
            raise PlanError("ZeRO-3 parameters are sharded: take the state with "
                            "ParallelModel.checkpoint_state() or inside `with model.gathered():`")

    def _sharded(self, optimizer: torch.optim.Optimizer) -> ShardedAdamW:
        if not isinstance(optimizer, ShardedAdamW) or optimizer is not self._optimizer:
            raise PlanError("a ZeroModel's checkpoint needs the optimizer from its build_optimizer()")
        return optimizer

    # --- accounting -----------------------------------------------------------------------------

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now for parameters, gradients and optimizer state (unique storages;
        with offload the optimizer state is host memory)."""
        params: dict[int, int] = {}
        grads: dict[int, int] = {}
        for u in self.units:
            for t in (u.full, u.shard):
                params[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            for p in u.params:
                if p.grad is not None:
                    grads[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
            if u.grads.shard is not None:
                s = u.grads.shard.untyped_storage()
                grads[s.data_ptr()] = s.nbytes()
        for p in self.module.parameters():  # frozen parameters are not sharded
            if not p.requires_grad:
                params[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        optim = _optimizer_bytes(self._optimizer) if self._optimizer is not None else 0
        params.pop(0, None)
        grads.pop(0, None)
        return {"params": sum(params.values()), "grads": sum(grads.values()), "optim": optim}


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def _params(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    """Parameters in the numbering of the plain optimizer state (group by group)."""
    return [p for group in groups for p in group["params"]]
