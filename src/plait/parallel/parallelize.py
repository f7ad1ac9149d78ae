"""parallelize(): the one place where a layout is applied to an already built plain model.

The order is fixed, and each strategy knows only its own mesh dimension:

1. tensor parallelism splits the model in place over tp (the model's plan, e.g. `GPT.plan()`);
2. activation recomputation wraps the (split) blocks;
3. a pipeline cuts the layers into stages over pp (each stage reduces over dp itself);
4. otherwise ZeRO shards over dp, or the data-parallel reducer averages over dp.

The tensor-parallel split is handed to whatever wraps it, so tp, tp × ZeRO and tp × pp share one
routine for dropout seeding, partial gradients and checkpoint gather/slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from plait.config import ParallelConfig, check_parallel
from plait.errors import PlanError
from plait.mesh import ParallelMesh
from plait.parallel.base import ParallelModel
from plait.parallel.data_parallel.build import build_comm_hook
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.memory.recompute import apply_recompute
from plait.parallel.pipeline.model import PipelineParallelModel
from plait.parallel.tensor_parallel.split import split_tensor_parallel
from plait.parallel.zero.model import ZeroModel


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig | None = None,
                plan: Any = None) -> ParallelModel:
    """Wrap `model` for `mesh`; the model must already be on `mesh.device`, identical on every rank.

    `cfg` gives the strategy options; its dp/pp/tp sizes must agree with the mesh (a config of
    another layout is refused, never silently ignored; dp = 0 means "what the mesh has"). With
    tp > 1 the model is split in place by `plan` (default: `type(model).plan()`), a mapping of
    module-name patterns to tensor-parallel styles; see plait.parallel.tensor_parallel.plan.
    """
    cfg = cfg or dataclasses.replace(ParallelConfig(), pp=mesh.pp_size, tp=mesh.tp_size)
    check_mesh_sizes(cfg, mesh)
    check_parallel(cfg, dp=mesh.dp_size)
    if not any(p.requires_grad for p in model.parameters()):
        raise PlanError("the model has no trainable parameters; nothing to parallelize")
    tensor = split_tensor_parallel(model, mesh, cfg, plan) if mesh.tp_size > 1 else None
    apply_recompute(model, cfg.recompute)  # after the split: it replays the split model's dropout
    if mesh.pp_size > 1:
        return PipelineParallelModel(model, mesh, cfg, tensor=tensor)
    hook = build_comm_hook(cfg, mesh, model)  # compression or hierarchical all-reduce, else None
    if cfg.zero > 0:
        return ZeroModel(model, mesh, cfg.zero, offload=cfg.offload_optimizer, bucket_mb=cfg.bucket_mb,
                         comm_hook=hook, reducer_mode=cfg.reducer, tensor=tensor)
    reducer = None
    if mesh.dp_size > 1:
        reducer = GradientReducer(model, mesh.dp_group, bucket_mb=cfg.bucket_mb, mode=cfg.reducer,
                                  comm_hook=hook)
    return ParallelModel(model, mesh, reducer, tensor=tensor)


def check_mesh_sizes(cfg: ParallelConfig, mesh: ParallelMesh) -> None:
    """The config's sizes must be the mesh's: a tp=2 config on a 1-process mesh is an error."""
    for dim in ("dp", "pp", "tp"):
        want, have = getattr(cfg, dim), mesh.size(dim)
        if dim == "dp" and want == 0:
            continue  # automatic: whatever the mesh has
        if want != have:
            raise PlanError(
                f"parallel.{dim}={want} does not match the mesh, which has {dim}={have} "
                f"({mesh.shape}); build the mesh from the same config "
                f"(ParallelMesh.from_config(cfg.parallel)) or set parallel.{dim}={have}"
            )
