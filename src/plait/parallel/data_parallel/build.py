"""Which gradient hook the reducer runs: chosen from the [parallel] config."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from plait.config import ParallelConfig
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.compression import build_compression_hook
from plait.parallel.data_parallel.hierarchical import build_hierarchical_hook


def build_comm_hook(cfg: ParallelConfig, mesh: ParallelMesh, model: nn.Module) -> Any:
    """The reducer hook that `cfg` (a ParallelConfig) asks for: a compression hook, hierarchical
    all-reduce over nodes of `cfg.node_size` dp ranks, or None for the default all-reduce.

    Collective when hierarchical (it creates process groups); call it on every rank.
    """
    if mesh.dp_size == 1:
        return None
    if cfg.compression != "none":
        return build_compression_hook(cfg, model, mesh.dp_size)
    if cfg.node_size > 0:
        return build_hierarchical_hook(mesh, cfg.node_size)
    return None
