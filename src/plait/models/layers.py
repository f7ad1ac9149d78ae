"""A model as an ordered list of layers, as plain data: what a pipeline places on its stages.

A model opts in to pipeline parallelism by defining `pipeline_spec()` returning a
:class:`PipelineSpec`. Each layer is a small module that runs the plain model's own submodules (no
copies) and names the submodule paths it owns, so a stage's state dict uses the plain model's
parameter names and a checkpoint written under one pipeline layout loads under any other. Models
describe themselves here; they import nothing of the strategies that use the description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


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
