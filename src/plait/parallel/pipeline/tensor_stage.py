"""Tensor parallelism inside pipeline stages (3-D: dp × pp × tp).

The plain model is split in place by the tensor-parallel plan (plait.parallel.tensor_plan) before
the pipeline takes its layers, so each stage holds the tp shards of its layers. What the
pipeline then adds per tp group mirrors plait.parallel.tensor_model: the dropout generator is
seeded alike on a tp group, sequence-parallel partial gradients are summed over tp, sharded
gradients count once per shard in the norm, and checkpoints gather / slice shards by their spec.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import ParallelConfig
from plait.errors import CheckpointError
from plait.mesh import ParallelMesh
from plait.parallel.tensor_model import split_for_tp
from plait.parallel.tensor_shard import shard_spec, sum_partial_grads


class StageTensorParallel:
    """The tp group of one pipeline stage: splitting, gradient sums, shard gather and slice."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig, plan: Any = None):
        """Split `model` in place over the mesh's tp group (identical plain model on every rank)."""
        self.mesh, self.group = mesh, mesh.tp_group
        self.rank, self.size = mesh.tp_rank, mesh.tp_size
        self.generator, self.seed = split_for_tp(model, mesh, cfg, plan)

    def reseed(self, step: int) -> None:
        """Same dropout masks on the tp group; different per dp replica, stage and step."""
        m = self.mesh
        self.generator.manual_seed((self.seed * 1_000_003 + (m.pp_rank * m.dp_size + m.dp_rank) * 7919
                                    + step) % (2 ** 63))

    def sum_partial_grads(self, params: list[nn.Parameter]) -> None:
        sum_partial_grads(params, self.group)

    @staticmethod
    def is_sharded(p: torch.Tensor) -> bool:
        return shard_spec(p) is not None

    def gather(self, p: nn.Parameter, t: torch.Tensor) -> torch.Tensor:
        """The full tensor of `p`'s shard `t` (or of optimizer state shaped like it). Collective."""
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
                                  f"expects size {spec.size} in dim {spec.dim} (check [model])")
        return spec.shard(full, self.rank, self.size).to(p.device)
