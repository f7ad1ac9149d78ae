"""train.compile: the model's forward through torch.compile.

The plain model is compiled in place (`nn.Module.compile`), not wrapped: its parameters, module
names and state_dict keys stay what they were, so the optimizer, the gradient reducer's hooks and
checkpoints see the same model whether it runs compiled or not. Only layouts that leave the
model's forward as it is are compiled (see `plait.config.validate_compile`).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from plait.config import TrainConfig

log = logging.getLogger(__name__)


def compile_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Compile `model`'s forward with cfg.compile_backend (and, for inductor, cfg.compile_mode).

    Compilation itself happens on the first call, so the first training step (and the first
    evaluation, a graph of its own) takes longer.
    """
    mode = cfg.compile_mode if cfg.compile_backend == "inductor" else None
    model.compile(backend=cfg.compile_backend, mode=mode)
    log.info("train.compile: the model runs through torch.compile (backend %s, mode %s); the first "
             "step includes compiling it", cfg.compile_backend, mode or "default")
