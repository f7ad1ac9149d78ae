"""The training-side half of tensor parallelism: gradients, clipping and checkpoints of a model
whose layers were split by a plan (see tensor_plan.py).

- Gradients: data-parallel averaging runs over the dp group only (each dp group member holds the
  same shard); with sequence parallelism, replicated parameters used on 1/tp of the tokens
  (norms, row biases, the position table) have their gradients summed over tp after backward.
- Clipping: the squared norm of sharded gradients is summed over tp; replicated ones count once.
- Checkpoints: shards are gathered into the plain model's full tensors (optimizer moments too)
  and sliced again on load, so a checkpoint written at one tp loads at any other, or at tp=1.
- Dropout on replicated activations draws from a generator seeded alike on a tp group, re-seeded
  from the step so a resumed run continues with the same masks.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import ParallelConfig
from plait.errors import CheckpointError, PlanError
from plait.mesh import ParallelMesh
from plait.parallel.data import GradientReducer
from plait.parallel.recompute import apply_recompute
from plait.parallel.tensor_plan import Plan, apply_plan, resolve_plan
from plait.parallel.tensor_shard import has_partial_grad, shard_spec, sum_partial_grads
from plait.parallelize import ParallelModel

log = logging.getLogger(__name__)


class TensorParallelModel(ParallelModel):
    """A plain model split over the mesh's tp group by a plan, averaged over its dp group."""

    def __init__(self, module: nn.Module, mesh: ParallelMesh, reducer: GradientReducer | None,
                 sequence_parallel: bool, dropout_generator: torch.Generator, dropout_seed: int):
        super().__init__(module, mesh, reducer)
        self.sequence_parallel = sequence_parallel
        self.dropout_generator = dropout_generator
        self.dropout_seed = dropout_seed
        self.steps_done = 0
        self._partial = [p for p in module.parameters() if has_partial_grad(p)]

    @property
    def tp_group(self):
        return self.mesh.tp_group

    # --- gradients ------------------------------------------------------------------------

    def forward_backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                         ) -> torch.Tensor:
        # Same masks on every tp rank, different per dp replica and per step.
        self.dropout_generator.manual_seed(
            (self.dropout_seed * 1_000_003 + self.mesh.dp_rank * 7919 + self.steps_done) % (2 ** 63))
        loss = super().forward_backward(micro_batches, autocast)
        sum_partial_grads(self._partial, self.tp_group)
        self.steps_done += 1
        return loss

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over the whole (unsharded) model; clips like torch's clip_grad_norm_."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        device = self.mesh.device
        sharded = torch.zeros((), device=device, dtype=torch.float32)
        replicated = torch.zeros((), device=device, dtype=torch.float32)
        for p in params:
            sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32) ** 2
            if shard_spec(p) is not None:
                sharded += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, group=self.tp_group)
        total = (sharded + replicated).sqrt()
        if max_norm > 0 and params:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.dtype))
        return total

    # --- checkpoints ----------------------------------------------------------------------

    def _gather(self, t: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        spec = shard_spec(p)
        shards = [torch.empty_like(t) for _ in range(self.mesh.tp_size)]
        dist.all_gather(shards, t.contiguous(), group=self.tp_group)
        return spec.unshard(shards)

    def _optimizer_params(self, optimizer: torch.optim.Optimizer) -> dict[int, nn.Parameter]:
        """Index in optimizer.state_dict() -> parameter (torch numbers them group by group)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return dict(enumerate(params))

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Full, unpadded tensors as the plain model has them; gathered by the first tp group."""
        if self.mesh.dp_rank != 0 or self.mesh.pp_rank != 0:
            return None  # every tp group holds the same values; the main rank's one gathers
        named = dict(self.module.named_parameters(remove_duplicate=False))
        gathered: dict[int, torch.Tensor] = {}
        model_state = {}
        for key, value in self.module.state_dict().items():
            p = named.get(key)
            if p is None or shard_spec(p) is None:
                model_state[key] = value
                continue
            if id(p) not in gathered:
                gathered[id(p)] = self._gather(value, p)
            model_state[key] = gathered[id(p)]
        optim = optimizer.state_dict()
        by_index = self._optimizer_params(optimizer)
        full_state = {}
        for idx, state in sorted(optim["state"].items()):
            p = by_index[idx]
            full_state[idx] = {
                k: (self._gather(v, p) if shard_spec(p) is not None and torch.is_tensor(v)
                    and v.shape == p.shape else v)
                for k, v in state.items()
            }
        if not self.mesh.is_main:
            return None
        return {"model": model_state, "optim": {**optim, "state": full_state}}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Slice this rank's shards out of a full (layout-independent) checkpoint."""
        rank, tp = self.mesh.tp_rank, self.mesh.tp_size
        named = dict(self.module.named_parameters(remove_duplicate=False))
        local = {}
        for key, value in state["model"].items():
            p = named.get(key)
            local[key] = value if p is None or shard_spec(p) is None else self._slice(value, p, key, rank, tp)
        self.module.load_state_dict(local)
        optim = state["optim"]
        by_index = self._optimizer_params(optimizer)
        local_state = {}
        for idx, st in optim["state"].items():
            p = by_index.get(int(idx))
            if p is None:
                raise CheckpointError(f"optimizer state has parameter #{idx}; this model has {len(by_index)}")
            spec = shard_spec(p)
            local_state[idx] = {
                k: (self._slice(v, p, f"optimizer state {k} of #{idx}", rank, tp)
                    if spec is not None and torch.is_tensor(v) and v.dim() == p.dim() and v.dim() > 0
                    else v)
                for k, v in st.items()
            }
        optimizer.load_state_dict({**optim, "state": local_state})
        step = state.get("state", {}).get("step")
        if step is not None:
            self.steps_done = int(step)

    @staticmethod
    def _slice(value: torch.Tensor, p: nn.Parameter, what: str, rank: int, tp: int) -> torch.Tensor:
        spec = shard_spec(p)
        if value.dim() != p.dim() or value.size(spec.dim) != spec.size:
            raise CheckpointError(f"checkpoint tensor {what} has shape {tuple(value.shape)}; this model "
                                  f"expects size {spec.size} in dim {spec.dim} (check [model])")
        return spec.shard(value, rank, tp).to(p.device)


# Options of other strategies that this version does not combine with tensor parallelism.
_NOT_WITH_TP = {"zero": 0, "offload_optimizer": False, "compression": "none", "node_size": 0}


def split_for_tp(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig,
                 plan: Plan | None = None) -> tuple[torch.Generator, int]:
    """Split `model` in place over the mesh's tp group; returns the shared dropout generator and seed.

    The plan is checked before any communication. Weights are broadcast from the first rank of the
    tp group first, so every shard comes from one copy; the seed is broadcast too, so replicated
    activations get the same dropout masks on every tp rank.
    """
    if plan is None:
        plan_fn = getattr(type(model), "plan", None)
        if not callable(plan_fn):
            raise PlanError(f"{type(model).__name__} has no plan(); pass plan= to parallelize() "
                            f"to split it over tp={mesh.tp_size}")
        plan = plan_fn()
    resolve_plan(model, plan, mesh.tp_size)  # a bad plan fails here, before any communication
    group = mesh.tp_group
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src, group=group)
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).to(mesh.device)
        dist.broadcast(seed, src=src, group=group)
    generator = torch.Generator(device=mesh.device)
    apply_plan(model, plan, group, sequence_parallel=cfg.sequence_parallel, dropout_generator=generator)
    return generator, int(seed.item())


def parallelize_tensor(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig,
                       plan: Plan | None = None) -> TensorParallelModel:
    """Split `model` in place over the mesh's tp group by `plan`, then average over its dp group.

    The plain model must be identical on every rank before the split (same seed); its weights
    are broadcast from the first rank of each tp group anyway, so every shard comes from one copy.
    """
    for name, default in _NOT_WITH_TP.items():
        value = getattr(cfg, name, default)
        if value != default:
            raise PlanError(f"parallel.{name}={value!r} is not supported together with "
                            f"parallel.tp={mesh.tp_size} in this version; use tp=1 or {name}={default!r}")
    generator, seed = split_for_tp(model, mesh, cfg, plan)
    apply_recompute(model, cfg.recompute)  # after the split: it replays the split model's dropout
    log.info("tensor parallel: tp=%d dp=%d sequence_parallel=%s", mesh.tp_size, mesh.dp_size,
             cfg.sequence_parallel)
    reducer = None
    if mesh.dp_size > 1:
        reducer = GradientReducer(model, mesh.dp_group, bucket_mb=cfg.bucket_mb, mode=cfg.reducer)
    return TensorParallelModel(model, mesh, reducer, cfg.sequence_parallel, generator, seed)
