"""The tensor-parallel side of a split model, shared by every layout that has tp > 1.

:func:`split_tensor_parallel` splits a plain model in place over the mesh's tp group by a plan
(see plan.py) and returns a :class:`TensorParallel`: the one routine that plain tp, tp × ZeRO and
tp × pp all use for what tensor parallelism adds to training:

- dropout on replicated activations draws from a generator seeded alike on a tp group and
  re-seeded from the step, so every tp rank draws the same masks and a resumed run continues them;
- with sequence parallelism, replicated parameters used on 1/tp of the tokens (norms, row biases,
  the position table) have partial gradients, summed over tp after backward;
- checkpoints gather shards into the plain model's full tensors (optimizer moments too) and slice
  them again on load, so a checkpoint written at one tp loads at any other, or at tp = 1.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import ParallelConfig
from plait.errors import CheckpointError, PlanError
from plait.mesh import ParallelMesh
from plait.parallel.collectives import broadcast_from_first
from plait.parallel.tensor_parallel.plan import Plan, apply_plan, resolve_plan
from plait.parallel.tensor_parallel.shard import shard_spec, sum_partial_grads

log = logging.getLogger(__name__)


class TensorParallel:
    """The tp group of one split model: dropout stream, partial gradients, shard gather and slice."""

    def __init__(self, mesh: ParallelMesh, generator: torch.Generator, seed: int,
                 sequence_parallel: bool):
        self.mesh, self.group = mesh, mesh.tp_group
        self.rank, self.size = mesh.tp_rank, mesh.tp_size
        self.generator, self.seed = generator, seed
        self.sequence_parallel = sequence_parallel

    # --- training step --------------------------------------------------------------------

    def reseed(self, step: int) -> None:
        """Same dropout masks on the tp group; different per dp replica, pipeline stage and step."""
        m = self.mesh
        stream = m.pp_rank * m.dp_size + m.dp_rank
        self.generator.manual_seed((self.seed * 1_000_003 + stream * 7919 + step) % (2 ** 63))

    def sum_partial_grads(self, params: list[nn.Parameter]) -> None:
        """Sequence parallelism: finish the partial gradients of replicated parameters over tp."""
        sum_partial_grads(params, self.group)

    @staticmethod
    def is_sharded(p: torch.Tensor) -> bool:
        return shard_spec(p) is not None

    # --- checkpoints ----------------------------------------------------------------------

    def gather(self, p: nn.Parameter, t: Any) -> Any:
        """The full tensor of `p`'s shard `t` (or of optimizer state shaped like it). Collective
        over tp for sharded parameters; anything else is returned as it is."""
        if shard_spec(p) is None or not torch.is_tensor(t) or t.shape != p.shape:
            return t
        shards = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(shards, t.contiguous(), group=self.group)
        return shard_spec(p).unshard(shards)

    def slice(self, p: nn.Parameter, full: Any, what: str) -> Any:
        """This rank's shard of a full tensor belonging to `p` (left alone when not sharded)."""
        spec = shard_spec(p)
        if spec is None or not torch.is_tensor(full) or full.dim() != p.dim() or full.dim() == 0:
            return full
        if full.size(spec.dim) != spec.size:
            raise CheckpointError(f"checkpoint tensor {what} has shape {tuple(full.shape)}; this model "
                                  f"expects size {spec.size} in dim {spec.dim} (check the [model] section)")
        return spec.shard(full, self.rank, self.size).to(p.device)

    def full_model_state(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """`module`'s tp-local `state` with every sharded entry gathered (tied weights once)."""
        named = dict(module.named_parameters(remove_duplicate=False))
        gathered: dict[int, torch.Tensor] = {}
        out = {}
        for key, value in state.items():
            p = named.get(key)
            if p is None or shard_spec(p) is None:
                out[key] = value
                continue
            if id(p) not in gathered:
                gathered[id(p)] = self.gather(p, value)
            out[key] = gathered[id(p)]
        return out

    def local_model_state(self, module: nn.Module, full: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Inverse of :meth:`full_model_state`: this rank's slices of a full state dict."""
        named = dict(module.named_parameters(remove_duplicate=False))
        return {k: self.slice(named[k], v, k) if k in named else v for k, v in full.items()}

    def full_optimizer_state(self, params: list[nn.Parameter], optim: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state_dict whose entry i belongs to `params[i]`, with moments gathered."""
        state = {idx: {k: self.gather(params[idx], v) for k, v in st.items()}
                 for idx, st in sorted(optim["state"].items())}
        return {**optim, "state": state}

    def local_optimizer_state(self, params: list[nn.Parameter], optim: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`full_optimizer_state`."""
        state = {}
        for idx, st in optim["state"].items():
            if not 0 <= int(idx) < len(params):
                raise CheckpointError(f"optimizer state has parameter #{idx}; this model has {len(params)}")
            p = params[int(idx)]
            state[idx] = {k: self.slice(p, v, f"optimizer state {k} of #{idx}") for k, v in st.items()}
        return {**optim, "state": state}


def split_tensor_parallel(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig,
                          plan: Plan | None = None) -> TensorParallel:
    """Split `model` in place over the mesh's tp group by `plan` (default: `type(model).plan()`).

    The plan is checked before any communication. Weights are broadcast from the first rank of the
    tp group first, so every shard comes from one copy; the dropout seed is broadcast too, so
    replicated activations get the same masks on every tp rank.
    """
    if plan is None:
        plan_fn = getattr(type(model), "plan", None)
        if not callable(plan_fn):
            raise PlanError(f"{type(model).__name__} has no plan(); pass plan= to parallelize() "
                            f"to split it over tp={mesh.tp_size}")
        plan = plan_fn()
    resolve_plan(model, plan, mesh.tp_size)  # a bad plan fails here, before any communication
    group = mesh.tp_group
    broadcast_from_first(model, group)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).to(mesh.device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    generator = torch.Generator(device=mesh.device)
    apply_plan(model, plan, group, sequence_parallel=cfg.sequence_parallel, dropout_generator=generator)
    log.info("tensor parallel: tp=%d sequence_parallel=%s", mesh.tp_size, cfg.sequence_parallel)
    return TensorParallel(mesh, generator, int(seed.item()), cfg.sequence_parallel)
