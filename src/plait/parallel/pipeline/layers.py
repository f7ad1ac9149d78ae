"""The pipeline's view of a model: its layer list (plait.models.layers) and stage modules."""

from __future__ import annotations

import torch.nn as nn

from plait.errors import PlanError
from plait.models.layers import PipeLayer, PipelineSpec

__all__ = ["PipeLayer", "PipelineSpec", "pipeline_spec", "stage_module"]


def pipeline_spec(model: nn.Module) -> PipelineSpec:
    """The model's layer list, from its `pipeline_spec()`."""
    if callable(getattr(model, "pipeline_spec", None)):
        return model.pipeline_spec()
    raise PlanError(
        f"{type(model).__name__} has no ordered layer list for pipeline parallelism; define "
        "pipeline_spec() returning a plait.models.layers.PipelineSpec, or use parallel.pp = 1"
    )


def stage_module(model: nn.Module, paths: list[str]) -> nn.Module:
    """An nn.Module holding `model`'s submodules at `paths` under the same dotted names.

    Its state_dict and named_parameters therefore use the plain model's names, restricted to
    what this stage owns.
    """
    root = nn.Module()
    for path in paths:
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, model.get_submodule(path))
    return root
