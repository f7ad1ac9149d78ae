"""A model as an ordered list of layers: the unit the pipeline partitioner places on stages.

A model opts in by defining `pipeline_spec()` (GPT's lives in `plait.models.gpt_layers`). Each
layer is a small module that runs the plain model's own submodules (no copies), and names the
submodule paths it owns, so a stage's state dict uses the plain model's parameter names and a
checkpoint written under one pipeline layout loads under any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from plait.errors import PlanError


@dataclass
class PipeLayer:
    """One layer: `module(x) -> x`, owning the plain model's submodules at `paths`."""

    name: str
    module: nn.Module
    paths: tuple[str, ...]
    flops_per_sample: float | None = None  # training FLOPs per sample, when known analytically


@dataclass
class PipelineSpec:
    """The ordered layers of a model, its loss, and what the partitioner needs to measure it.

    Layers `first_block .. first_block + num_blocks - 1` are the repeated blocks that interleaved
    schedules split evenly; layers before them join the first chunk, layers after the last.
    """

    layers: list[PipeLayer]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (last output, targets) -> mean loss
    example_input: Callable[[int], torch.Tensor]  # a batch of that many model inputs
    first_block: int
    num_blocks: int
    # Targets for that batch: lets measured-time partitioning charge the loss to the last layer.
    example_target: Callable[[int], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def pipeline_spec(model: nn.Module) -> PipelineSpec:
    """The model's layer list: `model.pipeline_spec()`, or GPT's built-in one."""
    if hasattr(model, "pipeline_spec"):
        return model.pipeline_spec()
    from plait.models.gpt import GPT
    if isinstance(model, GPT):
        from plait.models.gpt_layers import gpt_pipeline_spec
        return gpt_pipeline_spec(model)
    raise PlanError(
        f"{type(model).__name__} has no ordered layer list for pipeline parallelism; define "
        "pipeline_spec() returning a plait.parallel.pipeline.PipelineSpec, or use parallel.pp = 1"
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
